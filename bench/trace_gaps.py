"""Where a profiled step's main stream sits idle: the gaps between its kernels, read from a Chrome trace.

    python3 bench/trace_gaps.py TRACE.json.gz [--steps 2] [--out gaps.json]

TRACE is torch.profiler's Chrome trace (`bench/parallel.py --profile-steps N --trace PATH`). A gap is an interval in
which no compute kernel runs on any stream (a CUDA graph's replay spreads one step's kernels over many streams);
each gap is binned by the categories of the kernels around it (`profile_step.classify`: gemm, attention, triton,
...), and by what ran meanwhile: an exchange's barrier kernel or its copies on the copy engines (the step waited
for the exchange), or nothing (launch latency, a dependency between streams). The per-step totals say which of
those the step's idle time is made of.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import classify  # noqa: E402

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def device_events(trace: dict) -> list[tuple[str, float, float, str]]:
    """(kind, start µs, end µs, name) of every kernel, copy and memset in a Chrome trace, by start; kind: "copy"
    (a copy the profiler records as one: the copy engines), "barrier" (an exchange's barrier kernel) or "compute"
    (any other kernel or memset)."""
    out = []
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS and "dur" in e:
            name = e.get("name", "")
            kind = "copy" if e["cat"] == "gpu_memcpy" else "barrier" if "barrier" in name else "compute"
            out.append((kind, float(e["ts"]), float(e["ts"]) + float(e["dur"]), name))
    return sorted(out, key=lambda r: r[1])


def _covered(spans, lo: float, hi: float) -> tuple[float, list]:
    """How much of [lo, hi] the (start, end) spans cover, and the uncovered pieces."""
    cuts = sorted((max(x, lo), min(y, hi)) for x, y in spans if x < hi and y > lo)
    covered, rest, pos = 0.0, [], lo
    for x, y in cuts:
        if x > pos:
            rest.append((pos, x))
        covered += max(0.0, y - max(x, pos))
        pos = max(pos, y)
    if pos < hi:
        rest.append((pos, hi))
    return covered, rest


def gaps(events, min_us: float = 0.0) -> dict:
    """The time no compute kernel runs on the device, between the first and the last (see the module's
    docstring). A CUDA graph's replay spreads its kernels over many streams, so the compute kernels of every
    stream are taken together: a gap is an interval none of them covers."""
    compute = [e for e in events if e[0] == "compute"]
    if not compute:
        raise ValueError("the trace has no kernels on the device (was it profiled on a GPU?)")
    merged = []  # union of the compute intervals, each with the kernels that end and begin it
    for _, a, b, name in compute:
        if merged and a <= merged[-1][1]:
            if b > merged[-1][1]:
                merged[-1][1:3] = [b, name]
        else:
            merged.append([a, b, name, name])  # start, end, last kernel to end, first kernel to start
    side = {k: [(a, b) for kind, a, b, _ in events if kind == k] for k in ("barrier", "copy")}
    pairs, pair_n, during, sizes = collections.Counter(), collections.Counter(), collections.Counter(), []
    for prev, nxt in zip(merged, merged[1:]):
        a, b = prev[1], nxt[0]
        if b - a <= min_us:
            continue
        sizes.append(b - a)
        key = f"{classify(prev[2])} -> {classify(nxt[3])}"
        pairs[key] += b - a
        pair_n[key] += 1
        left = [(a, b)]  # the part of the gap a barrier covers (the wait it stands for), then copies, then none
        for kind in ("barrier", "copy"):
            rest = []
            for lo, hi in left:
                c, r = _covered(side[kind], lo, hi)
                during[kind] += c
                rest += r
            left = rest
        during["nothing"] += sum(hi - lo for lo, hi in left)
    return {"compute_busy_us": sum(b - a for a, b, *_ in merged), "span_us": merged[-1][1] - merged[0][0],
            "idle_us": sum(sizes), "gaps": len(sizes), "gap_us_median": sorted(sizes)[len(sizes) // 2] if sizes else 0.0,
            "during": dict(during),
            "pairs": {k: {"us": v, "count": pair_n[k]} for k, v in pairs.most_common()}}  # fmt: skip


def load(path: str) -> dict:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def per_step(report: dict, steps: int) -> dict:
    """The same report with every µs total as ms per step."""
    out = dict(report)
    for key in ("compute_busy_us", "span_us", "idle_us"):
        out[key.replace("_us", "_ms_per_step")] = out.pop(key) / 1e3 / steps
    out["during_ms_per_step"] = {k: v / 1e3 / steps for k, v in out.pop("during").items()}
    out["pairs"] = {k: {"ms_per_step": v["us"] / 1e3 / steps, "count_per_step": v["count"] / steps}
                    for k, v in out["pairs"].items()}  # fmt: skip
    out["gaps_per_step"] = out.pop("gaps") / steps
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=1, help="denoising steps the trace holds (totals are per step)")
    ap.add_argument("--min-us", type=float, default=0.0, help="ignore gaps this short or shorter")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    report = per_step(gaps(device_events(load(args.trace)), args.min_us), args.steps)
    print(f"compute kernels busy {report['compute_busy_ms_per_step']:.2f} ms/step over "
          f"{report['span_ms_per_step']:.2f}, idle {report['idle_ms_per_step']:.2f} in "
          f"{report['gaps_per_step']:.0f} gaps (median {report['gap_us_median']:.1f} µs)")  # fmt: skip
    print("  idle while: " + ", ".join(f"{k} {v:.2f} ms" for k, v in report["during_ms_per_step"].items()))
    for key, row in list(report["pairs"].items())[:12]:
        print(f"  {key:28s} {row['ms_per_step']:7.3f} ms/step in {row['count_per_step']:6.1f} gaps")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
