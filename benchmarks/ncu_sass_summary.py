"""Where a kernel's warps stall, from Nsight Compute's source page (``ncu -i R --page source --csv
--print-source sass``): the share of the stall samples in each warp-specialized partition (the
code between ``USETMAXREG`` instructions) with its main reasons, and the instructions with the
most samples.

    python benchmarks/ncu_sass_summary.py ra_gemm_sass.csv [--top 30]
"""
import argparse
import collections
import csv


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    with open(args.csv) as f:
        rows = list(csv.reader(f))
    head = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    hdr, data = rows[head], [r for r in rows[head + 1:] if len(r) == len(rows[head])]
    col = {h: i for i, h in enumerate(hdr)}
    reasons = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
    samples = [float(r[col["Warp Stall Sampling (All Samples)"]] or 0) for r in data]
    total = sum(samples) or 1.0
    print(f"{args.csv}: {len(data)} instructions, {total:.0f} stall samples\n")
    print("partition  first  share  instructions executed  main reasons (% of all samples)")
    part, first, by_part = 0, {0: data[0][0][-5:]}, collections.defaultdict(collections.Counter)
    for r in data:
        if "USETMAXREG" in r[1]:
            part += 1
            first[part] = r[0][-5:]
        for h in reasons:
            by_part[part][h[6:]] += float(r[col[h]] or 0)
        by_part[part]["#inst"] += float(r[col["Instructions Executed"]] or 0)
    for p, c in by_part.items():
        share = sum(v for h, v in c.items() if h != "#inst") / total * 100
        if share < 1:
            continue
        top = ", ".join(f"{h} {v / total * 100:.1f}" for h, v in c.most_common(7) if h != "#inst")
        print(f"{p:9d}  {first[p]}  {share:5.1f}  {c['#inst']:21.0f}  {top}")
    print(f"\nthe {args.top} instructions with the most samples (address, % of all samples, main reasons)")
    for s, r in sorted(zip(samples, data), key=lambda t: -t[0])[:args.top]:
        why = sorted(((float(r[col[h]] or 0), h[6:]) for h in reasons), reverse=True)[:2]
        print(f"  {r[0][-5:]} {s / total * 100:5.2f}  {r[1][:70]:70s} " + " ".join(f"{h} {v / total * 100:.2f}" for v, h in why if v))


if __name__ == "__main__":
    main()
