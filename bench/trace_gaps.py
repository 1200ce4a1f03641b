"""Where a profiled step's main stream sits idle: the gaps between its kernels, read from a Chrome trace.

    python3 bench/trace_gaps.py TRACE.json.gz [--steps 2] [--out gaps.json]

TRACE is torch.profiler's Chrome trace (`bench/parallel.py --profile-steps N --trace PATH`). The main stream is the
one with the most kernel time (the matmuls'). Every interval between two of its kernels (or copies) is a gap;
each gap is binned by the categories of the kernels around it (`profile_step.classify`: gemm, attention, triton,
...), and by what the other streams were doing meanwhile: an exchange's copies or its barrier kernel (the main
stream waited for the exchange), other work, or nothing (launch latency, a dependency between streams). The
per-step totals say which of those the step's idle time is made of.
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


def device_events(trace: dict) -> list[tuple[int, float, float, str]]:
    """(stream, start µs, end µs, name) of every kernel, copy and memset in a Chrome trace, by start."""
    out = []
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS and "dur" in e:
            stream = e.get("args", {}).get("stream", e.get("tid"))
            out.append((int(stream), float(e["ts"]), float(e["ts"]) + float(e["dur"]), e.get("name", "")))
    return sorted(out, key=lambda r: r[1])


def _kind(name: str) -> str:
    """What a side-stream event is, for a gap it overlaps: the exchange's barrier or copies, or other work."""
    if "barrier" in name:
        return "barrier"
    if "Memcpy" in name or "memcpy" in name:
        return "copy"
    return "other"


def gaps(events, min_us: float = 0.0) -> dict:
    """Idle time of the main stream between its events, binned (see the module's docstring)."""
    busy = collections.Counter()
    for stream, a, b, _ in events:
        busy[stream] += b - a
    if not busy:
        raise ValueError("the trace has no kernels or copies on the device (was it profiled on a GPU?)")
    main = busy.most_common(1)[0][0]
    mine = [e for e in events if e[0] == main]
    others = [e for e in events if e[0] != main]
    pairs, during = collections.Counter(), collections.Counter()
    pair_n, sizes, total = collections.Counter(), [], 0.0
    for prev, nxt in zip(mine, mine[1:]):
        a, b = prev[2], nxt[1]
        if b - a <= min_us:
            continue
        total += b - a
        sizes.append(b - a)
        key = f"{classify(prev[3])} -> {classify(nxt[3])}"
        pairs[key] += b - a
        pair_n[key] += 1
        # the part of the gap each kind of side-stream event covers (a barrier first: the wait it stands for)
        left = [(a, b)]
        for kind in ("barrier", "copy", "other"):
            spans = [(max(x, a), min(y, b)) for _, x, y, n in others if _kind(n) == kind and x < b and y > a]
            covered, rest = 0.0, []
            for lo, hi in left:
                cuts = sorted((max(x, lo), min(y, hi)) for x, y in spans if x < hi and y > lo)
                pos = lo
                for x, y in cuts:
                    if x > pos:
                        rest.append((pos, x))
                    covered += max(0.0, y - max(x, pos))
                    pos = max(pos, y)
                if pos < hi:
                    rest.append((pos, hi))
            during[kind] += covered
            left = rest
        during["nothing"] += sum(hi - lo for lo, hi in left)
    span = mine[-1][2] - mine[0][1] if mine else 0.0
    return {"main_stream": main, "main_busy_us": busy[main], "main_span_us": span, "idle_us": total,
            "gaps": len(sizes), "gap_us_median": sorted(sizes)[len(sizes) // 2] if sizes else 0.0,
            "during": dict(during),
            "pairs": {k: {"us": v, "count": pair_n[k]} for k, v in pairs.most_common()}}  # fmt: skip


def load(path: str) -> dict:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def per_step(report: dict, steps: int) -> dict:
    """The same report with every µs total as ms per step."""
    out = dict(report)
    for key in ("main_busy_us", "main_span_us", "idle_us"):
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
    print(f"main stream {report['main_stream']}: busy {report['main_busy_ms_per_step']:.2f} ms/step over "
          f"{report['main_span_ms_per_step']:.2f}, idle {report['idle_ms_per_step']:.2f} in "
          f"{report['gaps_per_step']:.0f} gaps (median {report['gap_us_median']:.1f} µs)")  # fmt: skip
    print("  idle while the other streams ran: " + ", ".join(f"{k} {v:.2f} ms" for k, v in
                                                              report["during_ms_per_step"].items()))  # fmt: skip
    for key, row in list(report["pairs"].items())[:12]:
        print(f"  {key:28s} {row['ms_per_step']:7.3f} ms/step in {row['count_per_step']:6.1f} gaps")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
