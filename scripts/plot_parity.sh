#!/usr/bin/env bash
# Plots the training-loss curves of the three precisions from the examples' CSVs (gnuplot from
# Debian: apt-get install gnuplot-nox). Usage: scripts/plot_parity.sh results/resnet20 "ResNet-20"
set -euo pipefail
prefix=$1
title=${2:-$1}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for p in fp32 bf16 fp16; do
  # step, moving average of the loss over 20 steps
  awk -F, 'NR > 1 { s += $3; q[NR] = $3; if (NR > 21) s -= q[NR - 20]; n = (NR - 1 < 20 ? NR - 1 : 20); print $1, s / n }' \
    "${prefix}_${p}.csv" > "$tmp/$p.dat"
done
gnuplot <<GP
set terminal pngcairo size 900,500 noenhanced
set output "${prefix}_loss.png"
set key top right
set xlabel "step"
set ylabel "training loss (moving average, 20 steps)"
set title "${title}: fp32 vs bf16 autocast vs fp16 autocast + GradScaler"
plot "$tmp/fp32.dat" with lines lw 2 title "fp32", "$tmp/bf16.dat" with lines lw 2 title "bf16", "$tmp/fp16.dat" with lines lw 2 title "fp16"
GP
echo "wrote ${prefix}_loss.png"
