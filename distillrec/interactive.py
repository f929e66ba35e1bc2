"""Interactive (text-steered) recommendation: build the query encoder, choose how a query joins the user state on
validation, and measure it on held-out test events with genre queries.

    distillrec query RUN                 # builds RUN/onnx/query/, writes RUN/interactive/report.md + report.json

Protocol (the run's leave-last-out split; docs/interactive.md):
  * an event is a user's validation or test target; its query is built from the TARGET item's genres only
    ("action adventure thriller"; ML-100K's item file, or --labels for other data), never its title; events whose
    target has no genre are skipped (counted). The genres build queries only: item texts and the data hash stay.
  * the served student ranks the catalog from the history before the target (seen items excluded): HR@10
    without a query, with it (u' = u + w q_hat), and a genre-filtered popularity baseline (items sharing the most
    of the query's genres first, then training popularity).
  * the query weight w is chosen on VALIDATION events (grid over multiples of the typical score scale), then
    written to meta.json; the test numbers are measured once, through the runtime's own `recommend_batch(queries=)`.
  * beside the distilled encoder, two teacher-side references: the LLM's own PMI of the query words (no
    distillation; [N, vocab] would have to be stored) and the mean-pooled LLM text vector of the query (the way item
    texts are encoded), projected by the student's text projection; each with its own validation-chosen weight,
    and the cost of encoding a query each way on one CPU thread.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

GENRE_WORDS = {"Sci-Fi": "science fiction", "Film-Noir": "film noir", "Children's": "children's"}
"""ML-100K genre names as a person would type them; the others are their lower-cased names. 'unknown' is no genre."""
WEIGHT_GRID = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""Query weights tried on validation, in units of the typical score spread (std over items of u.v+b, divided by
that of q_hat.v, median over events): 1.0 makes the query move scores as much as the user state does."""
FILTER_SIZES = (50, 100, 200, 400, 800)
"""Candidate-set sizes M of the filter-then-rank combination compared on validation (the M items closest to the
query, ranked by the user state)."""
K = 10
LATENCY_QUERY = "a funny and exciting action adventure movie with great space battles"
"""A 10-word query for the encoding-latency measurement (the issue's size)."""
N_BOOT = 1000


class InteractiveError(ValueError):
    """Missing export, missing genre labels: the message names the fix."""


# ----------------------------------------------------------------------------- genre labels -> queries
def ml100k_genres(ds) -> list[list[str]]:
    """Genres per internal item of an ML-100K run, read from the recbole wheel's item file (class column)."""
    from distill.data import DataError, find_ml100k_folder, read_table
    try:
        items = read_table(find_ml100k_folder() / "ml-100k.item")
    except DataError as e:
        raise InteractiveError(f"genre labels need ML-100K's item file: {e}; or pass --labels FILE") from None
    items.columns = [c.split(":")[0] for c in items.columns]  # recbole headers: 'class:token_seq'
    genres = dict(zip(items["item_id"].astype(str), items["class"].fillna("").astype(str)))
    return [[g for g in genres.get(str(i), "").split() if g != "unknown"] for i in ds.item_ids]


def read_labels(path: Path, ds) -> list[list[str]]:
    """--labels FILE: CSV/TSV with columns item_id, labels (space-separated) -> labels per internal item."""
    from distill.data import read_table
    raw = read_table(Path(path))
    if not {"item_id", "labels"} <= set(raw.columns):
        raise InteractiveError(f"{path}: needs columns item_id and labels (space-separated), has {list(raw.columns)}")
    got = dict(zip(raw["item_id"].astype(str), raw["labels"].fillna("").astype(str)))
    return [got.get(str(i), "").split() for i in ds.item_ids]


def genre_query(genres: list[str]) -> str:
    return " ".join(GENRE_WORDS.get(g, g.lower()) for g in genres)


# ----------------------------------------------------------------------------- events
class Events:
    """Validation or test events with a query: histories, targets, seen items, queries, genre sets."""

    def __init__(self, split, labels: list[list[str]], stage: str, max_history: int):
        users = [u for u in split.eval_users if labels[split.target(u, stage)[0]]]
        self.skipped = len(split.eval_users) - len(users)
        self.users = np.asarray(users, dtype=np.int64)
        self.targets = split.targets(self.users, stage)[0]
        self.seen = [split.seen(u, stage) for u in self.users]
        self.items, self.ratings = [], []
        for u in self.users:
            items, rates = split.history(u, stage, max_history)
            self.items.append([int(i) for i in items])
            self.ratings.append(None if rates is None else [float(r) for r in rates])
        self.genres = [labels[t] for t in self.targets]
        self.queries = [genre_query(g) for g in self.genres]

    def __len__(self) -> int:
        return len(self.users)


def _hits(scores: np.ndarray, ev: Events) -> np.ndarray:
    from distill import metrics as M
    return M.ranking_metrics(scores, ev.targets, ev.seen, ks=(K,))[f"HR@{K}"]


def genre_popularity_scores(ev: Events, labels: list[list[str]], popularity: np.ndarray) -> np.ndarray:
    """[E, N]: items sharing more of the query's genres first, training popularity within (the baseline)."""
    sets = [set(g) for g in labels]
    pop = popularity / (popularity.max() + 1.0)  # < 1: never outweighs one more shared genre
    out = np.empty((len(ev), len(labels)), dtype=np.float64)
    for e, g in enumerate(ev.genres):
        q = set(g)
        out[e] = np.fromiter((len(q & s) for s in sets), dtype=np.float64, count=len(sets)) + pop
    return out


# ----------------------------------------------------------------------------- scoring with a query direction
def _scale(base: np.ndarray, direction: np.ndarray) -> float:
    """Median over events of std(base row) / std(direction row), over the servable items (finite base scores):
    the unit of WEIGHT_GRID."""
    ok = np.isfinite(base)
    spread = np.nanstd(np.where(ok, base, np.nan), axis=1)
    return float(np.median(spread / np.maximum(np.nanstd(np.where(ok, direction, np.nan), axis=1), 1e-12)))


def choose_weight(base: np.ndarray, direction: np.ndarray, ev: Events) -> tuple[float, dict]:
    """(weight, {grid weight: validation HR@10}) maximising validation HR@10 of base + w * direction."""
    unit = _scale(base, direction)
    curve = {float(g * unit): float(_hits(base + g * unit * direction, ev).mean()) for g in WEIGHT_GRID}
    best = max(curve, key=lambda w: (curve[w], -w))
    return best, curve


def compare_combinations(base: np.ndarray, direction: np.ndarray, weight: float, ev: Events) -> dict:
    """Validation HR@10 of the ways a query can join the user state: the shift u + w q_hat (weight chosen before),
    and filter-then-rank: only the M items with the highest q_hat.v, ranked by the user score alone or by the
    shifted score. The runtime serves the shift; this says whether a filter would have been better."""
    out = {"shift": float(_hits(base + weight * direction, ev).mean())}
    for m in FILTER_SIZES:
        if m >= direction.shape[1]:
            continue
        thr = -np.partition(-direction, m - 1, axis=1)[:, m - 1:m]
        keep = direction >= thr
        out[f"filter{m}"] = float(_hits(np.where(keep, base, -np.inf), ev).mean())
        out[f"filter{m}+shift"] = float(_hits(np.where(keep, base + weight * direction, -np.inf), ev).mean())
    out["best"] = max((k for k in out if k != "best"), key=lambda k: out[k])
    return out


def _with_ci(values: np.ndarray, seed: int) -> dict:
    from distill.metrics import mean_ci
    return mean_ci(values, N_BOOT, seed)


def _ratio_ci(num: np.ndarray, den: np.ndarray, seed: int) -> dict:
    """mean(num) / mean(den) with a paired bootstrap CI over events."""
    from distill.metrics import bootstrap_ci
    lo, hi = bootstrap_ci(lambda w: (w @ num) / np.maximum(w @ den, 1e-12), len(num), N_BOOT, seed)
    return dict(mean=round(float(num.mean() / max(den.mean(), 1e-12)), 3), ci95=[round(lo, 3), round(hi, 3)])


CHUNK = 256
"""Events per runtime call."""


def _request_chunks(ev: Events, ids):
    """(slice, raw-id histories, ratings or None) of the events, CHUNK at a time: what a caller sends the runtime."""
    for s in range(0, len(ev), CHUNK):
        part = slice(s, s + CHUNK)
        yield part, [[ids[i] for i in h] for h in ev.items[part]], None if ev.ratings[0] is None else ev.ratings[part]


def _served_scores(rec, ev: Events, ids) -> np.ndarray:
    """[E, N] u.v + b of the served runtime (two-part) for the events' histories."""
    return np.concatenate([rec.predict_arrays(*rec.encode_histories(hist, rates))["next_item_scores"]
                           .astype(np.float64) for _, hist, rates in _request_chunks(ev, ids)])


def _served_hits(rec, ev: Events, ids, queries: Optional[list]) -> np.ndarray:
    """HR@10 per event from the runtime's own top-10 lists (recommend_batch). The runtime excludes the history it
    is sent (the last max_history items); the items seen before those go in `exclude`, as a service would."""
    index = {r: i for i, r in enumerate(ids)}
    hits = []
    for part, hist, rates in _request_chunks(ev, ids):
        older = [[ids[i] for i in set(seen.tolist()) - set(h)] for seen, h in zip(ev.seen[part], ev.items[part])]
        got = rec.recommend_batch(hist, rates, k=K, exclude=older,
                                  queries=None if queries is None else queries[part])
        hits += [float(t in {index[i] for i, _ in row}) for t, row in zip(ev.targets[part], got)]
    return np.asarray(hits)


# ----------------------------------------------------------------------------- latency
def _p50_ms(fn, reps: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(float(np.median(times)) * 1000, 3)


def teacher_query_latency_ms(rt, query: str, reps: int = 20) -> float:
    """p50 of the LLM's pooled text vector of one query (full-depth forward, one thread): the teacher encoder."""
    import torch

    from distill.teacher import load_base
    backbone, tok = load_base(rt.tc, seed=rt.seed)
    ids = torch.tensor([[tok.bos_id] + tok.encode(query)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            return _p50_ms(lambda: backbone(input_ids=ids).last_hidden_state.mean(1), reps, warmup=2)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the command
def query_study(run_dir, labels_file: Optional[str] = None, seed: int = 0, progress: bool = True,
                cfg=None) -> dict:
    """Build RUN/onnx/query/, choose the weight on validation, evaluate on test; RUN/interactive/report.*"""
    from distill.data import Split, load_dataset
    from distill.item_text import encode_item_texts, run_teacher
    from distill.teacher import describe_causal_lm, load_causal_lm
    from export.query_build import QueryBuildConfig, build_query_encoder, set_weight
    from export.query_encoder import QUERY_DIR, QueryEncoder
    from export.runtime import Recommender

    from .catalog import run_data_config
    run = Path(run_dir)
    onnx = run / "onnx"
    if not (onnx / "runtime.json").is_file():
        raise InteractiveError(f"{onnx / 'runtime.json'} not found: export the student first "
                               f"(`distillrec export {run}`)")
    ds = load_dataset(run_data_config(run))
    split = Split.leave_last_out(ds)
    labels = read_labels(Path(labels_file), ds) if labels_file else ml100k_genres(ds)
    plain = Recommender(onnx, use_query_encoder=False, intra_op_threads=1)
    if plain.mode != "two_part":
        raise InteractiveError(f"{onnx} serves one graph ({plain.mode}); a query steers the user vector of the "
                               "two-part export: re-export with the default two-part layout")
    table = plain.catalog.table
    raw_ids = [str(i) for i in ds.item_ids]
    if table.ids[:len(raw_ids)] != raw_ids:
        raise InteractiveError(f"{onnx}/items does not start with the run's {len(raw_ids)} items in training order; "
                               "re-export the run (`distillrec export`)")
    V = np.asarray(table.vectors[:len(raw_ids)], dtype=np.float32)  # the trained items: their texts are known
    V_all = np.asarray(table.vectors, dtype=np.float64)  # every served row (items added since training too)
    active = np.asarray(table.active, dtype=bool)

    # 1. build (weight 1 for now) --------------------------------------------------------------------------------
    rt = run_teacher(run)
    lm, tok = load_causal_lm(rt.tc, seed=rt.seed)
    val, test = (Events(split, labels, s, plain.max_history) for s in ("val", "test"))
    vocab_words = sorted({w for ev in (val, test) for q in ev.queries for w in q.split()})
    first = {w: int(tok(" " + w, add_special_tokens=False)["input_ids"][0]) for w in vocab_words}
    cfg = cfg or QueryBuildConfig(keep_tokens=tuple(sorted(set(first.values()))))
    col = {t: j for j, t in enumerate(cfg.keep_tokens)}
    author = describe_causal_lm(rt.tc)
    folder, fit = build_query_encoder(lm, tok, ds.item_text, V, onnx / QUERY_DIR, table.version,
                                      source=f"PMI of next-token predictions of {author}, ridge-fitted to the "
                                      f"student's item table v{table.version}", cfg=cfg, progress=progress)
    del lm
    encoder = QueryEncoder.load(folder, expected_dim=table.dim)  # the direction does not depend on the weight

    # 2. the directions, per stage -------------------------------------------------------------------------------
    from safetensors.numpy import load_file
    weights = load_file(str(run / "student" / "model.safetensors"))
    W = weights.get("text_proj.weight")
    pooled = {}
    if W is not None:
        texts = sorted({q for ev in (val, test) for q in ev.queries})
        tv = encode_item_texts(run, texts, progress=progress) @ W.T
        pooled = dict(zip(texts, tv / np.maximum(np.linalg.norm(tv, axis=1, keepdims=True), 1e-12)))

    def directions(ev: Events) -> dict:
        """[E, served rows] per method; the PMI reference knows only the trained items (0 = average elsewhere)."""
        d = {"distilled": encoder.encode_batch(ev.queries).astype(np.float64) @ V_all.T}
        pm = np.stack([fit.kept[:, [col[first[w]] for w in q.split()]].sum(1) for q in ev.queries])
        z = (pm - pm.mean(1, keepdims=True)) / np.maximum(pm.std(1, keepdims=True), 1e-12)
        d["teacher_pmi"] = np.pad(z, ((0, 0), (0, len(V_all) - len(V))))
        if pooled:
            d["teacher_pooled"] = np.stack([pooled[q] for q in ev.queries]).astype(np.float64) @ V_all.T
        return d

    # the served catalog: items removed from serving can never be recommended (-inf), as in the runtime
    base = {s: np.where(active, _served_scores(plain, ev, raw_ids), -np.inf)
            for s, ev in (("val", val), ("test", test))}
    dirs = {"val": directions(val), "test": directions(test)}

    # 3. weights chosen on validation, test measured once -------------------------------------------------------
    h0 = _hits(base["test"], test)
    pop = split.train_item_counts().astype(np.float64)
    gp = genre_popularity_scores(test, labels, pop)
    gp = np.where(active, np.pad(gp, ((0, 0), (0, len(V_all) - len(V))), constant_values=-1.0), -np.inf)
    hg = _hits(gp, test)
    methods, chosen = {}, {}
    for name in dirs["val"]:
        w, curve = choose_weight(base["val"], dirs["val"][name], val)
        chosen[name] = w
        h = _hits(base["test"] + w * dirs["test"][name], test)
        methods[name] = dict(weight=round(w, 4), val_curve={f"{k:.4g}": round(v, 4) for k, v in curve.items()},
                             test_hr10=_with_ci(h, seed), ratio_vs_no_query=_ratio_ci(h, h0, seed),
                             ratio_vs_genre_pop=_ratio_ci(h, hg, seed))
    combos = compare_combinations(base["val"], dirs["val"]["distilled"], chosen["distilled"], val)
    if combos["best"] != "shift":
        print(f"note: on validation {combos['best']} ({combos[combos['best']]:.4f}) beat the served shift "
              f"({combos['shift']:.4f}); the runtime serves the shift u + w q_hat")
    set_weight(folder, chosen["distilled"], extra=dict(weight_chosen_on="validation HR@10 of genre queries"))
    rec = Recommender(onnx, intra_op_threads=1)
    served = _served_hits(rec, test, raw_ids, test.queries)
    served0 = _served_hits(rec, test, raw_ids, None)

    # 4. cost ------------------------------------------------------------------------------------------------------
    enc = rec.query_encoder
    latency = dict(distilled_p50_ms=_p50_ms(lambda: enc.encode(LATENCY_QUERY), 2000, warmup=50),
                   teacher_pooled_p50_ms=teacher_query_latency_ms(rt, LATENCY_QUERY),
                   query_words=len(LATENCY_QUERY.split()),
                   token_vectors_mb=round(enc.token_vectors.nbytes / 2**20, 1),
                   teacher_pmi_matrix_mb=round(len(raw_ids) * fit.vt_pmi.shape[1] * 4 / 2**20, 1))
    out = dict(events=dict(val=len(val), test=len(test), skipped_no_genre=dict(val=val.skipped, test=test.skipped)),
               test_hr10=dict(no_query=_with_ci(h0, seed), genre_popularity=_with_ci(hg, seed),
                              served_with_query=_with_ci(served, seed), served_no_query=_with_ci(served0, seed)),
               methods=methods, val_combinations={k: (round(v, 4) if isinstance(v, float) else v)
                                                  for k, v in combos.items()}, latency=latency,
               build=dict(seconds=round(fit.seconds, 1), lm_tokens=fit.lm_tokens, templates=list(cfg.templates),
                          written_by=author),
               seed=seed)
    out_dir = run / "interactive"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(out, indent=2))
    (out_dir / "report.md").write_text(format_report(out))
    return out


def format_report(r: dict) -> str:
    def cell(d):
        return f"{d['mean']:.4f} [{d['ci95'][0]:.4f}, {d['ci95'][1]:.4f}]"

    def ratio(d):
        return f"{d['mean']:.2f} [{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}]"
    t, lat = r["test_hr10"], r["latency"]
    lines = ["# Interactive recommendation: genre queries on held-out test events", "",
             f"{r['events']['test']} test events with a genre query ({r['events']['skipped_no_genre']['test']} "
             f"skipped: target without genre); weights chosen on {r['events']['val']} validation events.", "",
             "| ranking (test HR@10, 95% bootstrap CI) | HR@10 | × no query | × genre popularity |",
             "|---|---|---|---|",
             f"| student, no query | {cell(t['no_query'])} | 1 | |",
             f"| genre-filtered popularity (baseline) | {cell(t['genre_popularity'])} | | 1 |"]
    names = {"distilled": "student + distilled query encoder (served)",
             "teacher_pmi": "student + the LLM's own PMI of the query words (no distillation)",
             "teacher_pooled": "student + LLM pooled text vector of the query, text projection"}
    for k, m in r["methods"].items():
        lines.append(f"| {names[k]} | {cell(m['test_hr10'])} | {ratio(m['ratio_vs_no_query'])} | "
                     f"{ratio(m['ratio_vs_genre_pop'])} |")
    lines += ["", f"Through the runtime's own `recommend_batch(queries=...)` (the artifact as served): HR@10 "
              f"{cell(t['served_with_query'])} with the query, {cell(t['served_no_query'])} without.", "",
              "| query encoding, one CPU thread, 10-word query | p50 | memory |", "|---|---|---|",
              f"| distilled encoder (tokenizer + token table) | {lat['distilled_p50_ms']} ms | "
              f"{lat['token_vectors_mb']} MB |",
              f"| teacher LLM, pooled text vector (full-depth forward) | {lat['teacher_pooled_p50_ms']} ms | the LLM |",
              f"| teacher PMI without distillation | lookup | {lat['teacher_pmi_matrix_mb']} MB ([items, vocab]) |", "",
              "Validation HR@10 per weight (the weight grid in score units):", ""]
    for k, m in r["methods"].items():
        lines.append(f"- {k}: " + ", ".join(f"{w}: {v}" for w, v in m["val_curve"].items()) + f" -> {m['weight']}")
    c = r["val_combinations"]
    lines += ["", "How the query joins the user state, validation HR@10 (distilled encoder): "
              + ", ".join(f"{k} {v}" for k, v in c.items() if k != "best") + f" -> best: {c['best']} "
              "(the runtime serves the shift u + w q_hat)."]
    b = r["build"]
    lines += ["", f"Build: {b['seconds']} s, {b['lm_tokens']} LLM tokens over the catalog ({len(b['templates'])} "
              f"templates); written by {b['written_by']}."]
    return "\n".join(lines) + "\n"
