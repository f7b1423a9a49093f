#!/usr/bin/env python3
"""Where a kernel's warps stall, by SASS instruction: reads the CSV that `tests/device/run.sh
ncu` writes beside its report ($OUT/ncu-NAME-sass.csv: `ncu --page source --print-source sass
--csv`, one table per profiled kernel) and prints, per kernel, the share of the warp stall
samples by reason, by opcode, and the instructions with the most samples (how often each ran
and its two largest reasons).

Warps that wait at the kernel's end (a producer warpgroup's idle warps at the last barrier)
are sampled too: read an instruction's samples beside its executions.

Usage (here, on what a device call brought back):
    python3 benches/ncu_sass.py ncu-NAME-sass.csv [--top N]
"""

import argparse
import collections
import csv

SAMPLES = "Warp Stall Sampling (All Samples)"


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def kernels(path):
    """(kernel name, header, rows) for each table of the CSV."""
    tables = []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if row and row[0] == "Kernel Name":
                tables.append([row[1], None, []])
            elif tables and tables[-1][1] is None:
                tables[-1][1] = row
            elif tables and len(row) == len(tables[-1][1]):
                tables[-1][2].append(row)
    return tables


def opcode(source):
    words = source.split()
    return words[1] if words[0].startswith("@") else words[0]


def report(name, header, rows, top):
    at = {h: i for i, h in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    total = sum(number(r[at[SAMPLES]]) for r in rows) or 1.0
    share = lambda x: f"{100 * x / total:.1f}%"
    by_reason = collections.Counter()
    by_opcode = collections.Counter()
    for r in rows:
        for reason in reasons:
            by_reason[reason[len("stall_"):]] += number(r[at[reason]])
        by_opcode[opcode(r[at["Source"]])] += number(r[at[SAMPLES]])
    print(f"== {name}: {len(rows)} instructions, {total:.0f} samples")
    print("   by reason:", ", ".join(f"{k} {share(v)}" for k, v in by_reason.most_common(10)))
    print("   by opcode:", ", ".join(f"{k} {share(v)}" for k, v in by_opcode.most_common(12)))
    for r in sorted(rows, key=lambda r: -number(r[at[SAMPLES]]))[:top]:
        largest = sorted(((number(r[at[x]]), x[len("stall_"):]) for x in reasons), reverse=True)[:2]
        why = ", ".join(f"{x} {share(v)}" for v, x in largest if v > 0)
        print(f"   {share(number(r[at[SAMPLES]])):>6} ran {r[at['Instructions Executed']]:>10}  "
              f"{r[at['Source']][:60]:60} {why}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="run.sh ncu's ncu-NAME-sass.csv")
    ap.add_argument("--top", type=int, default=12, help="instructions to list per kernel")
    args = ap.parse_args()
    for name, header, rows in kernels(args.csv):
        report(name, header, rows, args.top)


if __name__ == "__main__":
    main()
