"""What explain=True and query=... cost at batch 1, next to a plain recommend() (torch-free).

    python -m serve_bench.explain_latency runs/default/onnx --out explain_latency.json [--reps 2000]
        [--users 100] [--queries "space adventure" "romantic comedy"]

One Recommender (intra-op threads 1: the per-request cost, not a thread pool's), N seeded random users whose
histories are 50 item ids sampled from the catalog. After a warm-up, each rep times, in an order rotated from
rep to rep (so no variant always runs right after another), one call of each variant:

    plain         rec.recommend(history)
    explain       rec.recommend(history, explain=True)
    query         rec.recommend(history, query=q)              (only with a query encoder in the export)
    encode_query  rec.encode_query(q)                          (the text -> vector step alone)

The JSON holds p50 / p90 / p99 (ms) per variant and the ratios explain/plain and query/plain of each
percentile: ratios of ONE run, interleaved, so a machine that slows down slows every variant alike.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from serve_bench.timing import summarize

DEFAULT_QUERIES = ("space adventure with robots", "romantic comedy in paris", "dark crime thriller",
                   "animated family film", "documentary about music")
"""Plain English queries for a query encoder trained on real item text (pass --queries for another vocabulary)."""
HISTORY_LEN = 50


def sample_histories(item_ids: Sequence[str], users: int, length: int = HISTORY_LEN, seed: int = 0) -> list[list]:
    """`users` histories of `length` distinct catalog ids (fewer when the catalog is smaller), seeded."""
    rng = np.random.default_rng(seed)
    n = min(length, len(item_ids))
    return [[item_ids[i] for i in rng.choice(len(item_ids), size=n, replace=False)] for _ in range(users)]


def _variants(rec, queries: Sequence[str]) -> dict:
    """name -> fn(history, query): the calls timed (query ones only when the export serves queries)."""
    out = {"plain": lambda h, q: rec.recommend(h),
           "explain": lambda h, q: rec.recommend(h, explain=True)}
    if rec.has_query_encoder and queries:
        out["query"] = lambda h, q: rec.recommend(h, query=q)
        out["encode_query"] = lambda h, q: rec.encode_query(q)
    return out


def _percentiles(lat_ms: list) -> dict:
    s = summarize(lat_ms)
    return {"p50_ms": s["p50_ms"], "p90_ms": s["p90_ms"], "p99_ms": s["p99_ms"], "mean_ms": s["mean_ms"],
            "samples": s["samples"]}


def _ratio(num: dict, den: dict) -> dict:
    return {p: num[f"{p}_ms"] / den[f"{p}_ms"] for p in ("p50", "p90", "p99")}


def run(onnx_dir, reps: int = 2000, users: int = 100, queries: Optional[Sequence[str]] = None, warmup: int = 50,
        seed: int = 0, clock=time.perf_counter) -> dict:
    """Time the variants interleaved (see the module docstring); -> the report dict."""
    from export.runtime import Recommender
    if reps < 1 or users < 1 or warmup < 0:
        raise ValueError(f"reps and users must be >= 1 and warmup >= 0, got {reps}, {users}, {warmup}")
    rec = Recommender(onnx_dir, intra_op_threads=1)
    queries = list(DEFAULT_QUERIES if queries is None else queries)
    histories = sample_histories(rec.item_ids, users, seed=seed)
    variants = _variants(rec, queries)
    names = list(variants)
    for i in range(warmup):
        for fn in variants.values():
            fn(histories[i % users], queries[i % len(queries)] if queries else None)
    lat: dict[str, list] = {name: [] for name in names}
    for i in range(reps):
        h, q = histories[i % users], queries[i % len(queries)] if queries else None
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            t0 = clock()
            variants[name](h, q)
            lat[name].append((clock() - t0) * 1e3)
    latency = {name: _percentiles(v) for name, v in lat.items()}
    ratios = {"explain_over_plain": _ratio(latency["explain"], latency["plain"])}
    if "query" in latency:
        ratios["query_over_plain"] = _ratio(latency["query"], latency["plain"])
    enc = rec.query_encoder
    return {"onnx_dir": str(Path(onnx_dir)), "reps": reps, "users": users, "history_len": HISTORY_LEN,
            "k": rec.top_k, "n_items": rec.n_items, "mode": rec.mode, "intra_op_threads": rec.intra_op_threads,
            "explain_k": rec.explain_k, "explain_space": rec.explain_space,
            "queries": queries if enc is not None else None,
            "query_encoder": None if enc is None else {"weight": enc.weight, "source": enc.source},
            "latency_ms": latency, "ratios": ratios}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx_dir")
    ap.add_argument("--out", required=True, help="JSON report file")
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--queries", nargs="+", default=None, help="query texts (default: a few English ones)")
    args = ap.parse_args(argv)
    report = run(args.onnx_dir, reps=args.reps, users=args.users, queries=args.queries, warmup=args.warmup,
                 seed=args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({"latency_ms": {k: v["p50_ms"] for k, v in report["latency_ms"].items()},
                      "ratios": report["ratios"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
