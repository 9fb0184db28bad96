"""Sum Nsight Compute's `gpu__time_duration.sum` per kernel name over the LAST UNet call of a
`bench-gateway --sections unet --repeat 1` run profiled by tools/bench/gpu.sh (PROFILE=1).

    python3 tools/bench/ncu_summary.py ncu.csv

The section runs the same UNet call twice (a warm-up, then the timed one), after the jobs' text
encodings; the last call is found as the longest tail of the launch list that repeats right
before itself. Prints the top kernels by total time, with
their share and launch count, and the call's total kernel time.
"""
import csv
import sys
from collections import defaultdict


def main() -> None:
    rows = []
    with open(sys.argv[1], newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = r.get("Metric Unit", "nsecond")
        value = float(r["Metric Value"].replace(",", ""))
        scale = {"nsecond": 1e-9, "ns": 1e-9, "usecond": 1e-6, "us": 1e-6, "msecond": 1e-3, "ms": 1e-3, "second": 1.0, "s": 1.0}[unit]
        rows.append((int(r["ID"]), r["Kernel Name"], value * scale))
    rows.sort()
    names = [n for _, n, _ in rows]
    n = len(rows)
    best = None
    for length in range(n // 2, 0, -1):
        if names[n - length:] == names[n - 2 * length:n - length]:
            best = length
            break
    last = rows[n - best:] if best else rows
    total = sum(t for _, _, t in last)
    by = defaultdict(lambda: [0.0, 0])
    for _, name, t in last:
        key = name.split("(")[0][:90]
        by[key][0] += t
        by[key][1] += 1
    print(f"kernels of one call: {len(last)} launches, {total * 1e3:.1f} ms of kernel time"
          f" ({'split found' if best else 'no repeat found: all launches'}; {n} launches profiled)")
    for name, (t, c) in sorted(by.items(), key=lambda kv: -kv[1][0])[:30]:
        print(f"{t * 1e3:9.2f} ms {100 * t / total:5.1f}% {c:6d}x  {name}")


if __name__ == "__main__":
    main()
