#!/usr/bin/env bash
# Installs what mixprec's build, tests and examples need, only what is missing (Debian 12, root).
set -euo pipefail
# One package per line, each with why.
packages=(
  g++ cmake make          # build
  libeigen3-dev           # CPU GEMM backend
  zlib1g-dev              # gzip IDX files
  libgtest-dev            # tests
  libbenchmark-dev        # benchmarks/
  dataset-fashion-mnist   # examples/resnet
  fortunes                # examples/transformer
  python3                 # scripts
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
