#!/usr/bin/env bash
# Installs what mixprec's build, tests and examples need, only what is missing (Debian 12, root).
set -euo pipefail
packages=(g++ cmake make libeigen3-dev zlib1g-dev libgtest-dev libbenchmark-dev dataset-fashion-mnist fortunes python3)
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
