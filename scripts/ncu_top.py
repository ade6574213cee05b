#!/usr/bin/env python3
"""Where a GPU step's time goes: sums ncu's gpu__time_duration per kernel name.

    ncu --clock-control none --metrics gpu__time_duration.sum --csv PROGRAM ARGS > ncu.csv
    python3 scripts/ncu_top.py ncu.csv [--steps N]

Prints kernels by total time (ms, share, launches, mean us); --steps divides totals by the
number of profiled steps. Kernel names are shortened to their first template-free word.
"""
import csv
import sys
from collections import defaultdict


def short(name):
    name = name.split("(")[0]
    depth, out = 0, []
    for ch in name:  # drop template arguments
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    s = "".join(out).strip()
    return s.split(" ")[-1] or name[:60]


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0 if len(argv) >= 2 else 2
    steps = 1
    if "--steps" in argv:
        steps = max(1, int(argv[argv.index("--steps") + 1]))
    total = defaultdict(float)
    count = defaultdict(int)
    with open(argv[1], errors="replace") as f:
        rows = [line for line in f if line.startswith('"')]
    for r in csv.DictReader(rows):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        v = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "nsecond")
        ns = v * {"nsecond": 1, "usecond": 1e3, "msecond": 1e6, "second": 1e9}.get(unit, 1)
        k = short(r["Kernel Name"])
        total[k] += ns
        count[k] += 1
    all_ns = sum(total.values())
    print(f"{len(total)} kernels, {sum(count.values())} launches, {all_ns / 1e6 / steps:.3f} ms of GPU time per step ({steps} steps)")
    print(f"{'kernel':60s} {'ms/step':>9s} {'share':>6s} {'launches':>9s} {'mean us':>8s}")
    for k, ns in sorted(total.items(), key=lambda kv: -kv[1])[:30]:
        print(f"{k[:60]:60s} {ns / 1e6 / steps:9.3f} {100 * ns / all_ns:5.1f}% {count[k] / steps:9.1f} {ns / 1e3 / count[k]:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
