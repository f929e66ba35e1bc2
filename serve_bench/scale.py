"""Scale benchmark of two-part serving: synthetic catalogs of 10^4 .. 10^6 items served by the real encoder.

    python -m serve_bench.scale runs/cpu-default --sizes 1e4,1e5,1e6      # (distillrec scale-bench)
    run_scale_bench("runs/cpu-default", sizes=(10_000, 100_000))          # -> the report dict

Not part of the default bench run (it builds catalogs of up to 10^6 items and an ANN index over them).

The catalogs: the run's real item table (onnx/items) grown to N rows. Rows 0..n_real-1 ARE the real rows (so
real test histories stay valid and their items are excluded as seen); each further row is a noisy copy of a
real row drawn at random (a smoothed bootstrap, `synthetic_arrays`):

    row = mean + sqrt(1 - noise^2) * (parent - mean) + noise * std * N(0, 1)      (per dimension)

for the item vectors, the bias and the rating / like tower features alike (the same parent for all of an item's
arrays). The parent is shrunk toward the mean by exactly what the noise adds, so the per-dimension mean and std
of the real table are kept (not inflated by the noise), and so is the cluster structure of the real vectors
around each parent (uniform or isotropic noise would be no catalog: no structure for an ANN index to exploit,
no near-ties for it to get wrong). The teacher text vectors (text.npy) are left out: serving never reads them
and at 10^6 items they would be 2.3 GB.

Each catalog is served by the real `export.runtime.Recommender` (two-part mode, encoder.onnx, one intra-op
thread) with retrieval="exact" and retrieval="ann" in turn, and measured on the protocol's real test histories
(fixed length `history`, seen items excluded), the API path: raw ids in, raw ids out:
  * batch 1: `rec.recommend(history, ratings, k)` end to end, p50 / p90 / p99;
  * batch `batch`: `rec.recommend_batch(...)`, p50 per call and throughput (requests / busy second);
  * where the time goes: the encoder's bare session.run and the retriever's search alone, p50;
  * recall@10 of ANN against exact on the same requests (exact is 1.0 by definition);
  * memory: item table bytes, the index's `memory_bytes()`, and the process RSS delta from before the
    Recommender was built to after its measurements (psutil; file-backed mmap pages of the table count once
    touched), and the load / index build seconds.
Output: <run>/bench/scale/report.json, report.md (the table) and scale.png (p50 vs catalog size, exact vs
ANN, log-x, recall annotated); bench/report.md links it (serve_bench.report.scale_section).

torch-free: numpy, onnxruntime, faiss (ANN) and psutil; distill.data only to read the test histories.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .timing import time_calls

__all__ = ["run_scale_bench", "synthetic_arrays", "write_synthetic_catalog", "protocol_histories", "parse_sizes",
           "render_scale_markdown", "plot_scale", "DEFAULT_SIZES", "DEFAULT_ANN_PARAMS", "main"]

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
MODES = ("exact", "ann")
DEFAULT_NOISE = 0.5
"""Noise std as a fraction of the real per-dimension std: 25% of each synthetic row's variance is noise, 75% its
parent's structure. A copy then sits ~0.5 std per dimension from its parent: far enough that the ~600 copies of
a parent at 10^6 items are distinct items (not near-ties that make any top-10 ambiguous), near enough that the
real clusters remain clusters."""
DEFAULT_ANN_PARAMS = dict(index_type="ivf", nprobe=48)
"""The ANN index the bench times: export/retrieval.py's default (IVF-Flat over the MIPS->L2 transformed rows;
its docstring has the IVF vs HNSW measurements behind it), written out so the report names it."""
SERVED_ARRAYS = ("vectors", "bias", "rating", "like")
"""Table arrays a synthetic catalog carries (besides active / popularity): what serving reads. text.npy is not
read by the runtime (only by add-items' text projection) and would dominate the disk at 10^6 items."""
TARGET_ITEMS, TARGET_P50_MS, TARGET_RECALL = 1_000_000, 1.5, 0.95
SCALE_DIR = ("bench", "scale")
BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Recorded in the report: exact search is one numpy (BLAS) matmul, whose thread count these set at start-up
(OPENBLAS_NUM_THREADS=1 gives single-thread exact search, like the single-thread ANN search and encoder)."""
FILES_COPIED = ("runtime.json", "encoder.onnx", "scorer.onnx")


def _log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- catalogs
def synthetic_arrays(real: dict, n_items: int, noise: float = DEFAULT_NOISE, seed: int = 0,
                     chunk: int = 100_000) -> dict:
    """The real table arrays grown to `n_items` rows: real rows first, then noisy copies of random real rows.

    real: {name: array [n_real, ...]} with "vectors" and "bias" (plus any of "rating", "like", "popularity").
    Float arrays get the smoothed bootstrap of the module docstring (per-dimension mean and std kept);
    popularity is copied from the parent; active is all True. Rows are generated in chunks of `chunk` so the
    peak memory is the output plus one chunk. Returns new arrays (the inputs are not modified)."""
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must lie in [0, 1] (a fraction of the per-dimension std), got {noise}")
    n_real = int(np.shape(real["vectors"])[0])
    if n_items < n_real:
        raise ValueError(f"n_items={n_items} is smaller than the real table ({n_real} rows): a synthetic catalog "
                         f"keeps every real row")
    rng = np.random.default_rng([seed, n_items])
    parents = rng.integers(0, n_real, size=n_items - n_real)
    out = {}
    for name, a in real.items():
        a = np.asarray(a)
        full = np.empty((n_items,) + a.shape[1:], dtype=a.dtype)
        full[:n_real] = a
        if a.dtype.kind == "f":
            mean, std = a.mean(axis=0), a.std(axis=0)
            keep = np.float32(np.sqrt(1.0 - noise ** 2))
            for start in range(0, parents.size, chunk):
                p = parents[start:start + chunk]
                eps = rng.standard_normal((p.size,) + a.shape[1:], dtype=np.float32)
                full[n_real + start:n_real + start + p.size] = mean + keep * (a[p] - mean) + noise * std * eps
        else:
            full[n_real:] = a[parents]
        out[name] = full
    out["active"] = np.ones(n_items, dtype=bool)
    return out


def synthetic_ids(real_ids: Sequence[str], n_items: int) -> list[str]:
    """The real ids, then "syn<row>" for the synthetic rows; ValueError if a real id already looks like one."""
    ids = [str(x) for x in real_ids]
    extra = [f"syn{i}" for i in range(len(ids), n_items)]
    clash = set(ids) & set(extra)
    if clash:
        raise ValueError(f"real item ids {sorted(clash)[:5]} clash with the synthetic id scheme syn<row>")
    return ids + extra


def write_synthetic_catalog(onnx_dir: Path, dst: Path, n_items: int, noise: float = DEFAULT_NOISE,
                            seed: int = 0) -> Path:
    """dst/ = a servable two-part folder: the run's runtime.json, encoder.onnx and scorer.onnx (hard links where
    the file system allows, else copies) + items/ holding one synthetic table of `n_items` rows."""
    from export import contract as C
    from export.item_table import load_table, write_table
    onnx_dir, dst = Path(onnx_dir), Path(dst)
    meta = json.loads((onnx_dir / C.RUNTIME_META_FILE).read_text())
    if not isinstance(meta.get("two_part"), dict):
        raise FileNotFoundError(f"{onnx_dir} has no two-part model (runtime.json lacks \"two_part\"): re-export the "
                                f"run (`distillrec export <run>`) to get encoder.onnx and the item table")
    dst.mkdir(parents=True, exist_ok=True)
    for name in FILES_COPIED:
        src = onnx_dir / name
        if src.exists():
            try:
                os.link(src, dst / name)
            except OSError:
                shutil.copy2(src, dst / name)
    table = load_table(C.item_table_dir(onnx_dir))
    real = {k: np.asarray(table.arrays[k]) for k in SERVED_ARRAYS + ("popularity",) if k in table.arrays}
    arrays = synthetic_arrays(real, n_items, noise=noise, seed=seed)
    write_table(C.item_table_dir(dst), synthetic_ids(table.ids, n_items), arrays,
                change={"kind": "synthetic", "count": n_items, "real_rows": table.n_items, "noise": noise},
                trained_items=table.n_items, model_id=table.meta.get("model_id"))  # served by the same encoder
    return dst


# ---------------------------------------------------------------------------------------------- requests
def protocol_histories(run_dir: Path, n_requests: int, history: int,
                       seed: int) -> tuple[list[list[str]], list[list[float]]]:
    """Raw-id histories and ratings of up to `n_requests` protocol test users with >= `history` events before
    their test event (serve_bench.workload's fixed-length set), read from the run's config and data."""
    from distill.config import load_config
    from distill.data import Split, load_dataset
    from .workload import build_request_sets
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir / 'config.yaml'} is missing: the scale bench reads the run's test "
                                f"histories through its data config (or pass requests=(histories, ratings))")
    cfg = load_config(run_dir / "config.yaml")
    ds = load_dataset(cfg.data)
    split = Split.leave_last_out(ds)
    sets = build_request_sets(split, n_requests, cfg.data.max_history, 1, seed, history)
    rs = sets.get(f"fixed{min(history, cfg.data.max_history)}")
    if rs is None:
        raise ValueError(f"no test user has {history} events before the test event; lower --history")
    hist, rates = [], []
    for row in range(len(rs)):
        n = int(rs.length[row])
        hist.append([str(ds.item_ids[i]) for i in rs.items[row, -n:]])
        rates.append([float(r) for r in rs.ratings[row, -n:]])
    return hist, rates


# ---------------------------------------------------------------------------------------------- measuring
def _rss_mb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2 ** 20


def _table_bytes(table) -> int:
    return int(sum(np.asarray(a).nbytes for a in table.arrays.values()))


def _encoder_feed(rec, history: list[str], ratings: list[float]) -> dict:
    """The encoder's feed for one request, as the runtime builds it (gathered item vectors)."""
    items, rates, length = rec.encode_histories([history], [ratings])
    vec = np.ascontiguousarray(rec.catalog.table.vectors[items])
    return {"history_vectors": vec, "history_ratings": rates, "history_length": length}


def _breakdown(rec, reqs: list, k: int, min_samples: int, min_seconds: float) -> dict:
    """p50 of the encoder's bare session.run and of the retriever's search alone (batch 1, seen excluded)."""
    from export import contract as C
    cat = rec.catalog
    feeds = [_encoder_feed(rec, h, r) for h, r in reqs[:64]]
    names = list(rec.output_names)
    enc = time_calls(lambda f: rec.session.run(names, f), feeds, 10, min_samples, min_seconds)
    uvec = C.ENCODER_OUTPUTS["next_item"]
    queries = [(dict(zip(names, rec.session.run(names, f)))[uvec], {cat.index[x] for x in h})
               for f, (h, _) in zip(feeds, reqs)]
    srch = time_calls(lambda q: cat.retriever.search(q[0], k, banned=[q[1]]), queries, 10, min_samples, min_seconds)
    return dict(encoder_p50_ms=enc["p50_ms"], search_p50_ms=srch["p50_ms"], search_p99_ms=srch["p99_ms"])


def measure_mode(folder: Path, mode: str, reqs: list, k: int, batch: int, ann_params: dict,
                 min_samples: int, min_seconds: float) -> tuple[dict, list[list[str]]]:
    """Serve `folder` with retrieval=`mode` and measure it -> (row, the top-k ids of every request)."""
    from export.runtime import Recommender
    gc.collect()
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    rec = Recommender(folder, mode="two_part", retrieval=mode, intra_op_threads=1,
                      ann_params=ann_params if mode == "ann" else None)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    cat = rec.catalog
    ret = cat.retriever
    answers = [[i for i, _ in rec.recommend(h, ratings=r, k=k)] for h, r in reqs]
    b1 = time_calls(lambda q: rec.recommend(q[0], ratings=q[1], k=k), reqs, 10, min_samples, min_seconds)
    batches = [tuple(zip(*reqs[s:s + batch])) for s in range(0, len(reqs) - batch + 1, batch)] or \
        [tuple(zip(*(reqs * batch)[:batch]))]
    bb = time_calls(lambda q: rec.recommend_batch(list(q[0]), list(q[1]), k=k), batches, 2,
                    max(10, min_samples // 10), min_seconds, batch_size=batch)
    row = dict(items=cat.n_items, mode=mode, retriever=ret.kind, k=k,
               p50_ms=b1["p50_ms"], p90_ms=b1["p90_ms"], p99_ms=b1["p99_ms"], samples=b1["samples"],
               batch=batch, batch_p50_ms=bb["p50_ms"], batch_p99_ms=bb["p99_ms"],
               throughput_rps=bb["throughput_rps"], batch_samples=bb["samples"],
               **_breakdown(rec, reqs, k, min_samples, min_seconds),
               table_bytes=_table_bytes(cat.table), index_bytes=int(ret.memory_bytes()),
               rss_after_load_mb=rss_loaded - rss0, rss_delta_mb=_rss_mb() - rss0,
               load_seconds=load_s, build_seconds=float(getattr(ret, "build_seconds", 0.0)),
               params=ret.params() if hasattr(ret, "params") else {},
               ann_stats=dict(getattr(ret, "stats", {}) or {}), loadavg=list(os.getloadavg()))
    return row, answers  # the Recommender (and its index) is freed on return


def recall_vs_exact(exact: list[list[str]], approx: list[list[str]], k: int) -> float:
    """Mean over requests of |exact top-k ∩ approx top-k| / |exact top-k| (export.retrieval.recall_at_k on ids)."""
    from export.retrieval import recall_at_k
    def rows(lists):
        return [(np.asarray(ids, dtype=str), None) for ids in lists]
    return recall_at_k(rows(exact), rows(approx), k)


def measure_size(onnx_dir: Path, work: Path, n_items: int, reqs: list, modes: Sequence[str], k: int, batch: int,
                 ann_params: dict, noise: float, seed: int, min_samples: int, min_seconds: float) -> list[dict]:
    """Write one synthetic catalog, measure every mode on it, delete it; rows with recall@k vs exact."""
    folder = work / f"catalog-{n_items}"
    t0 = time.perf_counter()
    write_synthetic_catalog(onnx_dir, folder, n_items, noise=noise, seed=seed)
    write_s = time.perf_counter() - t0
    _log(f"{n_items:>9,} items: catalog written in {write_s:.1f} s")
    rows, answers = [], {}
    try:
        for mode in modes:
            row, answers[mode] = measure_mode(folder, mode, reqs, k, batch, ann_params, min_samples, min_seconds)
            row["catalog_write_seconds"] = write_s
            rows.append(row)
            _log(f"{n_items:>9,} items {mode:>5}: p50 {row['p50_ms']:.3f} ms p99 {row['p99_ms']:.3f} ms "
                 f"(encoder {row['encoder_p50_ms']:.3f}, search {row['search_p50_ms']:.3f}); "
                 f"b={batch} {row['throughput_rps']:,.0f} req/s; build {row['build_seconds']:.1f} s; "
                 f"RSS +{row['rss_delta_mb']:.0f} MB; load {row['loadavg'][0]:.1f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for row in rows:
        row["recall_at_k"] = recall_vs_exact(answers["exact"], answers[row["mode"]], k) if "exact" in answers \
            else None
    return rows


def evaluate_target(rows: list[dict]) -> dict:
    """The issue's target: 10^6 items, batch 1, end-to-end ANN p50 <= 1.5 ms with recall@10 >= 0.95 vs exact."""
    text = (f"{TARGET_ITEMS:,} items: end-to-end p50 <= {TARGET_P50_MS} ms at batch 1 (encoder + ANN + exclusion) "
            f"with recall@10 >= {TARGET_RECALL} against exact")
    ann = next((r for r in rows if r["items"] == TARGET_ITEMS and r["mode"] == "ann"), None)
    exact = next((r for r in rows if r["items"] == TARGET_ITEMS and r["mode"] == "exact"), None)
    if ann is None or ann.get("recall_at_k") is None:
        return dict(target=text, measured=f"not measured (no {TARGET_ITEMS:,}-item ANN row with an exact reference)",
                    met=None)
    met = ann["p50_ms"] <= TARGET_P50_MS and ann["recall_at_k"] >= TARGET_RECALL
    measured = f"ANN p50 {ann['p50_ms']:.3f} ms (p99 {ann['p99_ms']:.3f}), recall@10 {ann['recall_at_k']:.3f}"
    if exact:
        measured += f"; exact p50 {exact['p50_ms']:.3f} ms (p99 {exact['p99_ms']:.3f})"
    return dict(target=text, met=bool(met), p50_ms=ann["p50_ms"], recall=ann["recall_at_k"],
                exact_p50_ms=exact["p50_ms"] if exact else None, measured=measured)


# ---------------------------------------------------------------------------------------------- entry point
def run_scale_bench(run_dir, sizes: Sequence[int] = DEFAULT_SIZES, *, modes: Sequence[str] = MODES,
                    n_requests: int = 256, history: int = 50, k: int = 10, batch: int = 32,
                    ann_params: Optional[dict] = None, noise: float = DEFAULT_NOISE, min_samples: int = 300,
                    min_seconds: float = 1.0, requests: Optional[tuple] = None, onnx_dir=None, out_dir=None,
                    work_dir=None, seed: int = 0) -> dict:
    """Measure two-part serving on synthetic catalogs of `sizes` items; write report.json / report.md /
    scale.png to out_dir (default <run>/bench/scale) and link them from <run>/bench/report.md. Returns the report.

    modes: "exact" and/or "ann" (recall needs "exact"). requests: (histories, ratings) of raw ids, else the run's
    protocol test users with >= `history` events (n_requests of them). ann_params: AnnRetriever parameters
    (default DEFAULT_ANN_PARAMS). min_samples / min_seconds: batch-1 timing per point (warm-up excluded;
    batch `batch` gets a tenth of the samples). work_dir: where the catalogs are written (default a temp folder
    next to nothing else; 10^6 items take ~0.8 GB, deleted after each size)."""
    run_dir = Path(run_dir)
    onnx_dir = Path(onnx_dir) if onnx_dir is not None else run_dir / "onnx"
    out = Path(out_dir) if out_dir is not None else run_dir.joinpath(*SCALE_DIR)
    sizes = sorted({int(n) for n in sizes})
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {list(modes)}")
    ann_params = dict(DEFAULT_ANN_PARAMS if ann_params is None else ann_params)
    hist, rates = requests if requests is not None else protocol_histories(run_dir, n_requests, history, seed)
    if not hist:
        raise ValueError("no requests to measure")
    reqs = list(zip(hist, rates))
    t_start, load_start = time.perf_counter(), list(os.getloadavg())
    tmp = Path(tempfile.mkdtemp(prefix="scale_bench_", dir=work_dir))
    rows: list[dict] = []
    try:
        for n in sizes:
            rows += measure_size(onnx_dir, tmp, n, reqs, modes, k, batch, ann_params, noise, seed, min_samples,
                                 min_seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = dict(command=f"distillrec scale-bench {run_dir} --sizes {','.join(map(str, sizes))}",
                  machine=_machine(), loadavg_start=load_start, loadavg_end=list(os.getloadavg()),
                  seconds=time.perf_counter() - t_start,
                  settings=dict(sizes=sizes, modes=list(modes), requests=len(reqs), history=history, k=k,
                                batch=batch, ann_params=ann_params, noise=noise, seed=seed,
                                min_samples=min_samples, min_seconds=min_seconds, intra_op_threads=1,
                                blas_env={v: os.environ.get(v) for v in BLAS_ENV},
                                real_items=_real_items(onnx_dir), arrays=list(SERVED_ARRAYS)),
                  rows=rows, target=evaluate_target(rows))
    write_scale_report(report, out)
    _link_bench_report(run_dir, out)
    return report


def _machine() -> dict:
    import onnxruntime as ort
    from distill.machine import host_info
    info = dict(host_info(), numpy=np.__version__, onnxruntime=ort.__version__)
    try:
        import faiss
        info["faiss"] = faiss.__version__
    except ImportError:
        info["faiss"] = None
    return info


def _real_items(onnx_dir: Path) -> int:
    from export import contract as C
    from export.item_table import load_table
    return load_table(C.item_table_dir(onnx_dir)).n_items


def write_scale_report(report: dict, out: Path) -> None:
    """report.json, report.md and scale.png in `out`."""
    from distill.io import atomic_write_text, write_json
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_scale_markdown(report))
    plot_scale(report, out / "scale.png")


def _link_bench_report(run_dir: Path, out: Path) -> bool:
    """Re-render <run>/bench/report.md with the link to this scale report, when a bench report exists (the
    bench also picks it up whenever it runs). A bench report this version cannot render is left as it is."""
    from distill.io import atomic_write_text, write_json
    from .report import load_scale_summary, render_markdown
    bench = run_dir / "bench"
    if not (bench / "report.json").exists() or out.resolve() != run_dir.joinpath(*SCALE_DIR).resolve():
        return False
    try:
        rep = json.loads((bench / "report.json").read_text())
        rep["scale"] = load_scale_summary(run_dir)
        md = render_markdown(rep)
    except Exception as e:  # noqa: BLE001 - an older bench report: the next bench run links it
        _log(f"bench/report.md not re-rendered ({type(e).__name__}: {e}); the next bench run links the scale report")
        return False
    write_json(bench / "report.json", rep)
    atomic_write_text(bench / "report.md", md)
    return True


# ---------------------------------------------------------------------------------------------- report
def _ms(v) -> str:
    return "–" if v is None else (f"{v:.2f}" if v >= 1 else f"{v:.3f}")


def _mb(b) -> str:
    return f"{b / 2 ** 20:,.1f}"


def scale_table(report: dict) -> str:
    rows = report["rows"]
    b = report["settings"]["batch"]
    lines = [f"| items | retrieval | p50 ms b=1 | p90 ms | p99 ms | encoder p50 ms | search p50 ms | "
             f"b={b} p50 ms / call | req/s b={b} | recall@10 vs exact | index build s | load s | table MB | "
             f"index MB | RSS Δ MB |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rec = "–" if r.get("recall_at_k") is None else f"{r['recall_at_k']:.3f}"
        lines.append(f"| {r['items']:,} | {r['mode']} | {_ms(r['p50_ms'])} | {_ms(r['p90_ms'])} | {_ms(r['p99_ms'])} | "
                     f"{_ms(r['encoder_p50_ms'])} | {_ms(r['search_p50_ms'])} | {_ms(r['batch_p50_ms'])} | "
                     f"{r['throughput_rps']:,.0f} | {rec} | {r['build_seconds']:.1f} | {r['load_seconds']:.1f} | "
                     f"{_mb(r['table_bytes'])} | {_mb(r['index_bytes'])} | {r['rss_delta_mb']:,.0f} |")
    return "\n".join(lines)


def render_scale_markdown(report: dict) -> str:
    s, m, t = report["settings"], report["machine"], report["target"]
    met = {True: "**yes**", False: "**NO**", None: "not measured"}[t.get("met")]
    la0, la1 = report.get("loadavg_start") or [0, 0, 0], report.get("loadavg_end") or [0, 0, 0]
    ann = ", ".join(f"{k}={v}" for k, v in s["ann_params"].items())
    blas = ", ".join(f"{k}={v}" for k, v in (s.get("blas_env") or {}).items() if v) or \
        "unset (numpy default: all cores)"
    machine = f"{m.get('cpu_model', m.get('processor', '?'))}, {m.get('cpu_count')}"
    return f"""# Scale benchmark: two-part serving on synthetic catalogs

`{report['command']}` · {report['seconds']:.0f} s · {machine}
logical CPUs ({m.get('affinity_cpus', '?')} usable) · onnxruntime {m.get('onnxruntime')}, numpy {m.get('numpy')}, faiss
{m.get('faiss')}. Load average (1/5/15 min) {la0[0]:.2f}/{la0[1]:.2f}/{la0[2]:.2f} at the start,
{la1[0]:.2f}/{la1[1]:.2f}/{la1[2]:.2f} at the end: with a load above the CPU count other jobs shared the cores and the
latencies (p99 above all) are inflated by them.

## Target

| target | measured | met? |
|---|---|---|
| {t['target']} | {t['measured']} | {met} |

## Results

{scale_table(report)}

![p50 vs catalog size](scale.png)

## How it was measured

* Catalogs: the run's {s['real_items']:,} real item-table rows first (real histories stay valid), then noisy copies
  of random real rows (smoothed bootstrap, noise {s['noise']} x the per-dimension std, parents shrunk so the
  per-dimension mean and std are the real table's) for {', '.join(s['arrays'])}; seed {s['seed']}.
* Requests: {s['requests']} protocol test users with {s['history']}-event histories (their ratings included), the
  seen items excluded; `Recommender.recommend(history, ratings, k={s['k']})`: raw ids in, raw ids out, two-part
  mode, encoder.onnx on one intra-op thread; BLAS environment (exact search's numpy matmul):
  {blas}. b={s['batch']}: `recommend_batch` of {s['batch']} requests per call;
  req/s = requests / busy time.
* Per point: >= {s['min_samples']} calls and >= {s['min_seconds']} s after 10 warm-up calls (b={s['batch']}: a tenth
  of the calls). "encoder" = the bare encoder session.run, "search" = the retriever's search alone (batch 1, seen
  excluded), both p50.
* ANN: faiss {ann}, searched on one thread; candidates re-scored exactly, exclusion exact. recall@10 = mean
  overlap of its top-10 with exact's on the same requests.
* Memory: table MB = the item table's arrays (memory-mapped); index MB = the retriever's `memory_bytes()`;
  RSS Δ = process RSS after the measurements minus before the Recommender was built (the table's mmap pages count
  once touched: exact search touches all of them).
"""


def plot_scale(report: dict, path: Path) -> None:
    """p50 (solid) and p99 (dashed) at batch 1 vs catalog size, one colour per retrieval mode, log-log; the ANN
    points annotated with their recall@10; the target as a dotted line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from distill.io import atomic_path
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for mode, colour in (("exact", "tab:blue"), ("ann", "tab:orange")):
        rows = sorted((r for r in report["rows"] if r["mode"] == mode), key=lambda r: r["items"])
        if not rows:
            continue
        x = [r["items"] for r in rows]
        ax.plot(x, [r["p50_ms"] for r in rows], "-o", color=colour, label=f"{mode} p50")
        ax.plot(x, [r["p99_ms"] for r in rows], "--", color=colour, alpha=0.6, label=f"{mode} p99")
        if mode == "ann":
            for r in rows:
                if r.get("recall_at_k") is not None:
                    ax.annotate(f"recall@10 {r['recall_at_k']:.3f}", (r["items"], r["p50_ms"]),
                                textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.axhline(TARGET_P50_MS, linestyle=":", color="grey", label=f"target p50 {TARGET_P50_MS} ms at 10^6")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("catalog size (items)")
    ax.set_ylabel("latency per request, batch 1 (ms)")
    ax.set_title("Two-part serving: recommend() end to end vs catalog size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- CLI
def parse_sizes(text: str) -> list[int]:
    """'1e4,1e5,1e6' or '10000,100000' -> [10000, 100000, ...]; ValueError on anything else."""
    out = []
    for part in str(text).split(","):
        part = part.strip().replace("_", "")
        try:
            v = float(part)
        except ValueError:
            raise ValueError(f"--sizes takes comma-separated item counts (e.g. 1e4,1e5,1e6), got {part!r}") from None
        if v < 1 or v != int(v):
            raise ValueError(f"catalog sizes must be positive whole numbers, got {part!r}")
        out.append(int(v))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve_bench.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--sizes", default="1e4,1e5,1e6", help="catalog sizes, comma-separated (default 1e4,1e5,1e6)")
    p.add_argument("--modes", default="exact,ann", help="retrieval modes (exact,ann)")
    p.add_argument("--requests", type=int, default=256, help="test users measured (fixed-length histories)")
    p.add_argument("--history", type=int, default=50)
    p.add_argument("--onnx-dir", help="the two-part runtime folder (default <run>/onnx)")
    p.add_argument("--out", help="report folder (default <run>/bench/scale)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    run_scale_bench(Path(a.run_dir), parse_sizes(a.sizes), modes=[m.strip() for m in a.modes.split(",")],
                    n_requests=a.requests, history=a.history, onnx_dir=a.onnx_dir, out_dir=a.out, seed=a.seed)
    out = Path(a.out) if a.out else Path(a.run_dir).joinpath(*SCALE_DIR)
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
