#!/usr/bin/env python3
"""The GPU timing table: BENCH lines of mixprec_gpu_bench and torch_gpu.py -> Markdown.

    python3 benchmarks/peers/gpu_table.py results/gpu/bench.log [more logs ...]   (or stdin)
    python3 benchmarks/peers/gpu_table.py --self-test

Lines that do not start with BENCH are ignored, so a whole gpu_check.log can be read. A result
seen in several rounds (gpu_check.sh alternates the two sides) is the median of its rounds.
Training: ms per step of mixprec, PyTorch eager and PyTorch tuned, the time ratios (mixprec /
PyTorch: below 1 mixprec is faster), each side's speed-up over its own fp32, peak tensor MiB.
Bandwidth: GB/s (bytes read + written) and the share of the device-to-device copy rate measured
in the same run (issue 17's target: >= 70% for element-wise and cast kernels on >= 64 MB).
"""
import statistics
import sys

WORKLOADS = ["gpt12", "gpt2l", "resnet20", "gptmini"]
DESCRIPTION = {
    "gpt12": "GPT 12 layers, d 768, 12 heads, seq 256, batch 32, AdamW + clip",
    "gpt2l": "GPT 2 layers, d 768, 12 heads, seq 256, batch 32, AdamW + clip",
    "resnet20": "ResNet-20, batch 128, 3x32x32, SGD momentum",
    "gptmini": "GPT-mini, 4 layers, d 256, seq 128, batch 32, AdamW",
}
PRECISIONS = ["fp32", "bf16", "fp16"]
BW_ORDER = ["memcpy", "copy", "cast_f32_bf16", "cast_bf16_f32", "add", "add_row", "mul_scalar", "gelu", "relu", "sum",
            "adamw_multi", "grad_norm_multi", "clip_multi"]
IMPLS = ["mixprec", "torch", "torch-tuned"]
BW_TARGET = 70.0


def parse(lines):
    """{(impl, workload, precision): [ {field: float} per round ]}"""
    runs = {}
    for line in lines:
        f = line.split()
        if len(f) < 5 or f[0] != "BENCH":
            continue
        kv = {}
        for tok in f[4:]:
            if "=" in tok:
                k, v = tok.split("=", 1)
                try:
                    kv[k] = float(v)
                except ValueError:
                    pass
        runs.setdefault((f[1], f[2], f[3]), []).append(kv)
    return runs


def med(runs, key, field):
    vals = [r[field] for r in runs.get(key, []) if field in r]
    return statistics.median(vals) if vals else None


def fmt(v, spec=".2f"):
    return "—" if v is None else format(v, spec)


def ratio(a, b):
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def table(runs):
    out = []
    rounds = max((len(v) for v in runs.values()), default=0)
    train = [k for k in runs if not k[1].startswith("bw_")]
    workloads = WORKLOADS + sorted({k[1] for k in train} - set(WORKLOADS))
    workloads = [w for w in workloads if any(k[1] == w for k in train)]
    if workloads:
        out.append(f"Training step, ms (CUDA events, median of timed windows; median of up to {rounds} alternated rounds). "
                   "Ratios are mixprec / PyTorch time: below 1 mixprec is faster. "
                   "Speed-up: the side's fp32 ms / this precision's ms.")
        out.append("")
        out.append("| workload | precision | mixprec | torch eager | torch tuned | mixprec/eager | mixprec/tuned "
                   "| mixprec speed-up | tuned speed-up | peak MiB mixprec | peak MiB eager | peak MiB tuned |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for w in workloads:
            precs = PRECISIONS + sorted({k[2] for k in train if k[1] == w} - set(PRECISIONS))
            for p in precs:
                ms = {i: med(runs, (i, w, p), "ms_per_step") for i in IMPLS}
                if all(v is None for v in ms.values()):
                    continue
                mib = {i: med(runs, (i, w, p), "peak_mib") for i in IMPLS}
                fp32 = {i: med(runs, (i, w, "fp32"), "ms_per_step") for i in IMPLS}
                out.append(f"| {w} | {p} | {fmt(ms['mixprec'])} | {fmt(ms['torch'])} | {fmt(ms['torch-tuned'])} "
                           f"| {ratio(ms['mixprec'], ms['torch'])} | {ratio(ms['mixprec'], ms['torch-tuned'])} "
                           f"| {ratio(fp32['mixprec'], ms['mixprec'])} | {ratio(fp32['torch-tuned'], ms['torch-tuned'])} "
                           f"| {fmt(mib['mixprec'], '.0f')} | {fmt(mib['torch'], '.0f')} | {fmt(mib['torch-tuned'], '.0f')} |")
        out.append("")
        for w in workloads:
            if w in DESCRIPTION:
                out.append(f"- {w}: {DESCRIPTION[w]}")
        out.append("")
    bw = [k for k in runs if k[1].startswith("bw_")]
    if bw:
        names = [n for n in BW_ORDER if any(k[1] == "bw_" + n for k in bw)]
        names += sorted({k[1][3:] for k in bw} - set(names))
        ref = med(runs, ("mixprec", "bw_memcpy", "float32"), "gbps")
        out.append("Element-wise bandwidth, GB/s = (bytes read + written) / time on contiguous tensors >= 64 MB "
                   "(the *_multi lines: the fused optimizer/norm passes over the same elements as 48 tensors); "
                   f"% of copy: against the cudaMemcpy device-to-device rate of the same run ({fmt(ref, '.0f')} GB/s for mixprec); "
                   f"target >= {BW_TARGET:.0f}%.")
        out.append("")
        out.append("| op | dtype | mixprec GB/s | mixprec % of copy | target met | torch GB/s | torch % of copy | mixprec/torch |")
        out.append("|---|---|---|---|---|---|---|---|")
        for n in names:
            dtypes = sorted({k[2] for k in bw if k[1] == "bw_" + n}, key=lambda d: (d != "float32", d))
            for d in dtypes:
                g = {i: med(runs, (i, "bw_" + n, d), "gbps") for i in ("mixprec", "torch")}
                pct = {i: med(runs, (i, "bw_" + n, d), "pct_of_copy") for i in ("mixprec", "torch")}
                met = "—" if pct["mixprec"] is None or n == "memcpy" else ("yes" if pct["mixprec"] >= BW_TARGET else "no")
                out.append(f"| {n} | {d} | {fmt(g['mixprec'], '.0f')} | {fmt(pct['mixprec'], '.0f')} | {met} "
                           f"| {fmt(g['torch'], '.0f')} | {fmt(pct['torch'], '.0f')} | {ratio(g['mixprec'], g['torch'])} |")
        out.append("")
    tg = targets(runs)
    if tg:
        out += ["Issue 17's targets:", ""] + tg + [""]
    if not out:
        out.append("(no BENCH lines found)")
    return "\n".join(out)


def targets(runs):
    """Issue 17's targets that these lines can decide, one '- ...: met/not met' line each."""
    out = []
    ms = lambda impl, w, p: med(runs, (impl, w, p), "ms_per_step")
    verdict = lambda ok: "met" if ok else "NOT met"
    ours, eager, fp32 = ms("mixprec", "gpt12", "bf16"), ms("torch", "gpt12", "bf16"), ms("mixprec", "gpt12", "fp32")
    if ours is not None and eager is not None:
        out.append(f"- gpt12 bf16 >= 1.2x PyTorch eager's tokens/s: {eager / ours:.2f}x ({ours:.2f} vs {eager:.2f} ms/step): "
                   f"{verdict(eager / ours >= 1.2)}")
    if ours is not None:
        out.append(f"- gpt12 bf16 <= 16 ms/step: {ours:.2f}: {verdict(ours <= 16.0)}")
    if ours is not None and fp32 is not None:
        out.append(f"- gpt12 bf16 >= 4x our own fp32: {fp32 / ours:.2f}x: {verdict(fp32 / ours >= 4.0)}")
    for w in ("resnet20", "gptmini"):
        v = ms("mixprec", w, "bf16-graph")
        if v is not None:
            out.append(f"- {w} bf16 with the captured step (CapturedStep) <= 2 ms/step: {v:.2f}: {verdict(v <= 2.0)}")
        else:
            v = ms("mixprec", w, "bf16")
            if v is not None:
                out.append(f"- {w} bf16 <= 2 ms/step (the issue asks it of the captured step, not timed here; this is the "
                           f"eager step): {v:.2f}: {verdict(v <= 2.0)}")
    pcts = [(k[1][3:], k[2], med(runs, k, "pct_of_copy")) for k in runs
            if k[0] == "mixprec" and k[1].startswith("bw_") and k[1] != "bw_memcpy"]
    pcts = [x for x in pcts if x[2] is not None]
    if pcts:
        worst = min(pcts, key=lambda x: x[2])
        below = sum(1 for x in pcts if x[2] < BW_TARGET)
        out.append(f"- element-wise and cast kernels >= {BW_TARGET:.0f}% of copy bandwidth: {len(pcts) - below} of {len(pcts)} "
                   f"(lowest: {worst[0]} {worst[1]} {worst[2]:.0f}%): {verdict(below == 0)}")
    return out


SAMPLE = """\
# round 1
BENCH mixprec gpt12 fp32 ms_per_step=146.000 peak_mib=7434.0 skipped=0 steps=15
BENCH mixprec gpt12 bf16 ms_per_step=80.000 peak_mib=6040.0 skipped=0 steps=15
BENCH mixprec resnet20 bf16 ms_per_step=4.000 peak_mib=150.0 skipped=0 steps=60
BENCH mixprec resnet20 bf16-graph ms_per_step=1.500 peak_mib=150.0 skipped=0 steps=60
BENCH torch gpt12 bf16 ms_per_step=30.200 peak_mib=3968.0 skipped=0 steps=15
BENCH torch-tuned gpt12 fp32 ms_per_step=104.000 peak_mib=5843.0 skipped=0 steps=15
BENCH torch-tuned gpt12 bf16 ms_per_step=19.300 peak_mib=3968.0 skipped=0 steps=15
BENCH mixprec bw_memcpy float32 gbps=4000.0 pct_of_copy=100.0
BENCH mixprec bw_cast_f32_bf16 float32 gbps=2000.0 pct_of_copy=50.0
BENCH torch bw_memcpy float32 gbps=3900.0 pct_of_copy=100.0
BENCH torch bw_cast_f32_bf16 float32 gbps=3510.0 pct_of_copy=90.0
=== rc=0 after 1000 ms
# round 2
BENCH mixprec gpt12 bf16 ms_per_step=90.000 peak_mib=6040.0 skipped=0 steps=15
BENCH torch gpt12 bf16 ms_per_step=30.400 peak_mib=3968.0 skipped=0 steps=15
BENCH mixprec bw_cast_f32_bf16 float32 gbps=3000.0 pct_of_copy=75.0
"""


def self_test():
    t = table(parse(SAMPLE.splitlines()))
    expect = [
        "| gpt12 | bf16 | 85.00 | 30.30 | 19.30 | 2.81 | 4.40 | 1.72 | 5.39 | 6040 | 3968 | 3968 |",  # medians of 2 rounds
        "| gpt12 | fp32 | 146.00 | — | 104.00 | — | 1.40 | 1.00 | 1.00 | 7434 | — | 5843 |",
        "| cast_f32_bf16 | float32 | 2500 | 62 | no | 3510 | 90 | 0.71 |",
        "| memcpy | float32 | 4000 | 100 | — | 3900 | 100 | 1.03 |",
        "- gpt12 bf16 >= 1.2x PyTorch eager's tokens/s: 0.36x (85.00 vs 30.30 ms/step): NOT met",
        "- gpt12 bf16 >= 4x our own fp32: 1.72x: NOT met",
        "- element-wise and cast kernels >= 70% of copy bandwidth: 0 of 1 (lowest: cast_f32_bf16 float32 62%): NOT met",
        "- resnet20 bf16 with the captured step (CapturedStep) <= 2 ms/step: 1.50: met",
        "| resnet20 | bf16-graph | 1.50 | — | — | — | — | — | — | 150 | — | — |",
    ]
    missing = [e for e in expect if e not in t]
    if missing or "| gpt2l |" in t:  # no lines, no row
        print(t)
        print("gpu_table self-test FAILED; missing rows:\n" + "\n".join(missing))
        return 1
    if table({}) != "(no BENCH lines found)":
        print("gpu_table self-test FAILED: empty input")
        return 1
    print("gpu_table self-test ok")
    return 0


def main(argv):
    if argv[1:] == ["--self-test"]:
        return self_test()
    if any(a in ("-h", "--help") for a in argv[1:]):
        print(__doc__)
        return 0
    lines = []
    if len(argv) > 1:
        for path in argv[1:]:
            with open(path, errors="replace") as f:
                lines += f.readlines()
    else:
        lines = sys.stdin.readlines()
    print(table(parse(lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
