#!/usr/bin/env python3
"""compare.sh's table: a file of RESULT lines (mixprec_workloads, torch_workloads) -> Markdown.

Lines that do not start with RESULT are ignored, so a saved compare.sh output can be re-read:
    python3 benchmarks/peers/table.py results/peers_<date>.txt
"""
import statistics
import sys

runs = {}
for line in open(sys.argv[1]):
    line = line.strip()
    if line.startswith("lib="):  # the raw-run listing of a saved report
        line = "RESULT " + line
    if not line.startswith("RESULT "):
        continue
    kv = dict(f.split("=", 1) for f in line.split()[1:])
    runs.setdefault((kv["lib"], kv["workload"], kv["precision"]), []).append(kv)


def agg(key, field, how):
    r = runs.get(key)
    return how(float(x[field]) for x in r) if r else None


def median(xs):
    return statistics.median(list(xs))


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def ratio(a, b):
    return "—" if a is None or b is None else f"{a / b:.2f}"


gemm = {k[2]: float(v[0]["gflops"]) for k, v in runs.items() if k[1] == "gemm"}
if gemm:
    print("Op-layer GEMM at 1024^3 (GFLOP/s): " + ", ".join(f"{p} {gemm[p]:.0f}" for p in ("fp32", "bf16", "fp16") if p in gemm))
    print()
print("| workload | precision | GFLOP/step | ms/step ours | ms/step LibTorch | time ours/LibTorch | best step ours/LibTorch "
      "| GFLOP/s ours (of GEMM peak) | GFLOP/s LibTorch | peak MiB ours | peak MiB LibTorch | peak ours/LibTorch | ours peak / ours fp32 peak |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for w in ("resnet20", "gpt-mini"):
    for p in ("fp32", "bf16", "fp16"):
        o, t = ("mixprec", w, p), ("libtorch", w, p)
        if o not in runs and t not in runs:
            continue
        ot, tt = agg(o, "ms_median", median), agg(t, "ms_median", median)
        ob, tb = agg(o, "ms_min", min), agg(t, "ms_min", min)
        om, tm = agg(o, "peak_bytes", median), agg(t, "peak_bytes", median)
        f32 = agg(("mixprec", w, "fp32"), "peak_bytes", median)
        gf = agg(o, "gflop_per_step", median) if o in runs and "gflop_per_step" in runs[o][0] else None
        rate_o = gf / ot * 1e3 if gf and ot else None
        rate_t = gf / tt * 1e3 if gf and tt else None
        frac = f" ({rate_o / gemm[p]:.0%})" if rate_o and p in gemm else ""
        print(f"| {w} | {p} | {fmt(gf, '.1f')} | {fmt(ot, '.0f')} | {fmt(tt, '.0f')} | {ratio(ot, tt)} | {ratio(ob, tb)} "
              f"| {fmt(rate_o, '.0f')}{frac} | {fmt(rate_t, '.0f')} "
              f"| {fmt(om and om / 2**20, '.1f')} | {fmt(tm and tm / 2**20, '.1f')} | {ratio(om, tm)} | {ratio(om, f32)} |")
print()
print("ms/step: median over rounds of each run's median step; best step: fastest single step of all rounds (the")
print("least disturbed by other processes). Peak: live tensor bytes at the step's high-water mark (weights, AdamW")
print("state, activations, gradients); LibTorch's counted by an allocator installed with c10::SetCPUAllocator.")
print("Time ratio < 1: mixprec faster (target <= 0.67, i.e. 1.5x). Last column: AMP target <= 0.55.")
print("GFLOP/step: the step's GEMM and convolution FLOPs (benchmarks/workloads.hpp, flops_per_step), the same work on")
print("both sides; GFLOP/s = that / ms per step, and in brackets its share of our GEMM rate in that precision.")
print()
print("Raw runs:")
print("```")
for k in sorted(runs):
    for x in runs[k]:
        print(" ".join(f"{a}={b}" for a, b in x.items()))
print("```")
