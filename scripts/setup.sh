#!/usr/bin/env bash
# Installs what mixprec's build, tests, examples and the README's scripts need, only what is
# missing (Debian 12, root); prints nothing when everything is there.
set -euo pipefail
# One package per line, each with why.
packages=(
  g++ cmake make          # build
  libeigen3-dev           # CPU GEMM backend
  zlib1g-dev              # gzip IDX files
  libgtest-dev            # tests
  libbenchmark-dev        # benchmarks/
  libdnnl-dev             # mixprec::onednn (CPU convolutions, optional); benchmarks' GEMM yardstick
  dataset-fashion-mnist   # examples/resnet
  fortunes                # examples/transformer
  python3                 # scripts
  gnuplot-nox             # scripts/plot_parity.sh: the precisions' loss curves (no X11 needed)
  libcli11-dev            # examples/: command-line flags with per-flag help (header-only CLI11)
  libopenmpi-dev          # data-parallel training (mixprec::mpi)
  openmpi-bin             # mpirun for the data-parallel tests and --distributed
  clang-14                # scripts/fuzz.sh: libFuzzer targets (fuzz/)
  libclang-rt-14-dev      # scripts/fuzz.sh: libFuzzer, ASan and UBSan runtimes for clang
)
# `scripts/setup.sh peers` (benchmarks/peers/compare.sh runs it) also installs the LibTorch peer;
# the build and tests never need it, so CI does not download it.
if [ "${1:-}" = peers ]; then
  packages+=(
    libtorch-dev          # benchmarks/peers: the LibTorch side of the peer comparison
    libopenblas0-openmp   # benchmarks/peers: LibTorch's fp32 matmul BLAS (Debian's default is the reference BLAS)
  )
fi
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
