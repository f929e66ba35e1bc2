"""Recommendation reasons: the teacher LLM writes them, the served student explains without an LLM.

    distillrec explain RUN --user 42 --k 5     # one user's top-k: the student's supporting history items and the
                                               # teacher's reason for each
    distillrec explain RUN                     # the agreement study: a seeded sample of test users, reasons cached

Which weights write a reason: the teacher's base LM at FULL depth with its LM head (`distill.teacher.load_causal_lm`),
reading item TITLES. The teacher stage's LoRA adapter is not applied: it was trained on soft item tokens through a
truncated trunk (`teacher.input: item_tokens`, `teacher.layers`), which a title prompt does not use.

The agreement study (`reason_study`), per sampled test user (history = everything before the test item):
  1. the served runtime recommends from the last `history_items` items (the ones the teacher's prompt shows; the
     older ones are excluded from the list, not fed), k = 3, explain=True in both explain spaces (item, text);
  2. the teacher writes one reason per recommended item; with `naming` 'greedy' (default) or 'calibrated'
     (distill/reasons.py) it names exactly one shown history title, chosen by the LLM;
  3. agreement = the named item is among the student's 3 supporting items; the baseline is the same event for 3
     history items drawn at random, computed exactly (3 / distinct shown items), and a recency reference (the 3
     most recent items) is reported beside it.
Every user's record is appended to reasons.jsonl as soon as it is written, so a killed study resumes where it
stopped; `report.md` / `report.json` hold the agreement with bootstrap CIs over users and the cost per reason.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

from distill.reasons import ReasonConfig

SPACES = ("item", "text")
"""Explain spaces the study measures (export/runtime.py: student item vectors, teacher text vectors)."""
TOP = 3
"""Recommended items per user the study explains, and supporting items per recommendation (the issue's top-3)."""
N_BOOT = 1000


class ExplainError(ValueError):
    """A run that cannot be explained (no export, unknown user); the message names the fix."""


class _Setup:
    """What both commands need: the run's data, split, served runtime(s), the teacher LM."""

    def __init__(self, run_dir: Path, spaces=SPACES):
        from distill.data import Split, load_dataset
        from distill.item_text import run_teacher
        from distill.teacher import describe_causal_lm
        from export.runtime import Recommender

        from .catalog import run_data_config
        self.run = Path(run_dir)
        onnx = self.run / "onnx"
        if not (onnx / "runtime.json").is_file():
            raise ExplainError(f"{onnx / 'runtime.json'} not found: export the student first (`distillrec export "
                               f"{self.run}`)")
        self.ds = load_dataset(run_data_config(self.run))
        self.split = Split.leave_last_out(self.ds)
        self.recs = {s: Recommender(onnx, explain_space=s, explain_k=TOP, intra_op_threads=1,
                                    use_query_encoder=False) for s in spaces}
        self.index = {str(r): i for i, r in enumerate(self.ds.item_ids)}
        self.teacher = run_teacher(self.run)
        self.author = describe_causal_lm(self.teacher.tc)
        self._lm = None

    @property
    def lm_tok(self):
        """(LM, tokenizer), loaded on first use: a resumed study with nothing left to write never loads it."""
        if self._lm is None:
            from distill.teacher import load_causal_lm
            self._lm = load_causal_lm(self.teacher.tc, seed=self.teacher.seed)
        return self._lm

    def titles(self, raw_ids) -> list[str]:
        return [self.ds.item_text[self.index[str(r)]] for r in raw_ids]


def _recommend(setup: _Setup, history: list[int], ratings, cfg: ReasonConfig, k: int) -> tuple[list, dict]:
    """Internal history (+ ratings or None) -> (raw ids shown: the last cfg.history_items, {space: [(id, score,
    because)]} recommended from them with the older items excluded from the list)."""
    n = cfg.history_items
    shown = [str(setup.ds.item_ids[i]) for i in history[-n:]]
    older = [str(setup.ds.item_ids[i]) for i in history[:-n]]
    rates = None if ratings is None else [float(r) for r in ratings[-n:]]
    return shown, {s: rec.recommend(shown, rates, k=k, exclude=older, explain=True) for s, rec in setup.recs.items()}


# ----------------------------------------------------------------------------- one user
def explain_user(run_dir, user_id: str, k: int = 5, cfg: Optional[ReasonConfig] = None,
                 space: str = "item") -> dict:
    """The student's top-k for user `user_id` (raw id; history = all of the user's interactions), each with its
    supporting history items and the teacher's reason."""
    from distill.reasons import generate_reasons
    cfg = cfg or ReasonConfig()
    setup = _Setup(Path(run_dir), spaces=(space,))
    users = {str(u): i for i, u in enumerate(setup.ds.user_ids)}
    if str(user_id) not in users:
        some = list(users)[:5]
        raise ExplainError(f"user {user_id!r} is not in the run's data ({len(users)} users, e.g. {some}); pass a "
                           "raw user id of the interaction file")
    u = users[str(user_id)]
    history = [int(i) for i in setup.ds.items[u]]
    shown, got = _recommend(setup, history, None if setup.ds.ratings is None else setup.ds.ratings[u], cfg, k)
    recs = got[space]
    t0 = time.perf_counter()
    reasons = generate_reasons(*setup.lm_tok, setup.titles(shown), setup.titles([r[0] for r in recs]), cfg)
    seconds = time.perf_counter() - t0
    items = [dict(id=i, title=setup.titles([i])[0], score=round(s, 4),
                  because=[dict(id=h, title=setup.titles([h])[0], similarity=round(w, 4)) for h, w in because],
                  reason=r.sentence, teacher_names=(setup.titles([shown[r.named]])[0] if r.named >= 0 else None))
             for (i, s, because), r in zip(recs, reasons)]
    return dict(user=str(user_id), history_shown=setup.titles(shown), explain_space=space, items=items,
                written_by=setup.author, seconds=round(seconds, 3),
                seconds_per_reason=round(seconds / max(1, len(items)), 3))


def format_user(out: dict) -> str:
    lines = [f"user {out['user']}: the last {len(out['history_shown'])} history items feed the student and the "
             f"teacher's prompt", f"reasons written by: {out['written_by']}",
             f"{out['seconds']} s for {len(out['items'])} reasons ({out['seconds_per_reason']} s each)", ""]
    for rank, it in enumerate(out["items"], 1):
        because = "; ".join(f"{b['title']} ({b['similarity']:.2f})" for b in it["because"])
        lines += [f"{rank}. {it['title']}  [score {it['score']}]",
                  f"   student ({out['explain_space']} space): because you watched {because}",
                  f"   teacher: {it['reason']}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the agreement study
def _sample_users(split, n: int, seed: int) -> list[int]:
    users = np.asarray(split.eval_users)
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(users, size=min(n, len(users)), replace=False).tolist())


RECORD_VERSION = 2
"""Bumped when the reasons the same settings produce change (2: max_new_tokens counts after the named title)."""


def _settings(cfg: ReasonConfig) -> dict:
    return dict(history_items=cfg.history_items, max_new_tokens=cfg.max_new_tokens, naming=cfg.naming,
                version=RECORD_VERSION)


def _done(path: Path, cfg: ReasonConfig) -> dict:
    """Records already in reasons.jsonl (a killed study's) written with the same settings, by user; a torn last
    line and records of other settings are ignored (rewritten)."""
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("settings") == _settings(cfg):
                out[rec["user"]] = rec
    return out


def _user_record(setup: _Setup, user: int, cfg: ReasonConfig) -> dict:
    from distill.reasons import generate_reasons
    items, ratings = setup.split.history(user, "test")
    shown, got = _recommend(setup, [int(i) for i in items], ratings, cfg, TOP)
    first = got[SPACES[0]]
    titles = setup.titles(shown)
    reasons = generate_reasons(*setup.lm_tok, titles, setup.titles([r[0] for r in first]), cfg)
    return dict(user=int(user), settings=_settings(cfg), shown=shown, recs=[r[0] for r in first],
                support={s: [[h for h, _ in r[2]] for r in got[s]] for s in got},
                named=[shown[r.named] if r.named >= 0 else None for r in reasons],
                reasons=[r.sentence for r in reasons], seconds=reasons[0].call_seconds if reasons else 0.0,
                tokens=dict(prefix=reasons[0].n_prefix_tokens if reasons else 0,
                            suffix=[r.n_suffix_tokens for r in reasons], generated=[r.n_generated for r in reasons]))


def _per_user(records: list[dict]) -> dict[str, np.ndarray]:
    """Per-user means over its reasons: agreement per space, the random baseline (exact), recency reference."""
    cols: dict[str, list] = {f"agree_{s}": [] for s in SPACES}
    cols.update(random=[], recent=[], named=[])
    for rec in records:
        distinct = list(dict.fromkeys(rec["shown"]))
        rows = {k: [] for k in cols}
        for j, named in enumerate(rec["named"]):
            rows["named"].append(named is not None)
            for s in SPACES:
                rows[f"agree_{s}"].append(named is not None and named in rec["support"][s][j])
            pool = [h for h in distinct if h != rec["recs"][j]]
            rows["random"].append(0.0 if named is None else min(1.0, TOP / max(1, len(pool))))
            rows["recent"].append(named is not None and named in pool[-TOP:])
        for k in cols:
            cols[k].append(float(np.mean(rows[k])) if rows[k] else 0.0)
    return {k: np.asarray(v) for k, v in cols.items()}


def summarise(records: list[dict], seed: int = 0) -> dict:
    """Agreement per explain space vs the random baseline, with bootstrap CIs over users, and the cost."""
    from distill.metrics import mean_ci
    per = _per_user(records)
    out: dict = {"users": len(records), "reasons": int(sum(len(r["named"]) for r in records))}
    for k, v in per.items():
        out[k] = mean_ci(v, N_BOOT, seed)
    for s in SPACES:
        ratio = per[f"agree_{s}"] / np.maximum(per["random"].mean(), 1e-12)
        out[f"ratio_{s}"] = mean_ci(ratio, N_BOOT, seed, digits=3)
    n = max(1, out["reasons"])
    secs = sum(r["seconds"] for r in records)
    gen = sum(sum(r["tokens"]["generated"]) for r in records)
    out["cost"] = dict(seconds_per_reason=round(secs / n, 3), seconds_per_user=round(secs / max(1, len(records)), 3),
                       prefix_tokens_mean=round(float(np.mean([r["tokens"]["prefix"] for r in records])), 1),
                       generated_tokens_per_reason=round(gen / n, 1),
                       generated_tokens_per_s=round(gen / max(secs, 1e-9), 1))
    return out


def reason_study(run_dir, users: int = 100, seed: int = 0, cfg: Optional[ReasonConfig] = None,
                 progress: bool = True) -> dict:
    """Reasons for the student's top-3 of `users` seeded test users, cached in RUN/reasons/reasons.jsonl (resumed
    when present), and the agreement report (RUN/reasons/report.md, report.json)."""
    from tqdm.auto import tqdm
    cfg = cfg or ReasonConfig()
    run = Path(run_dir)
    setup = _Setup(run)
    out_dir = run / "reasons"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "reasons.jsonl"
    done = _done(path, cfg)
    sample = _sample_users(setup.split, users, seed)
    todo = [u for u in sample if u not in done]
    if done:
        print(f"{len(done)} user(s) already in {path}, {len(todo)} to write")
    with open(path, "a") as f:
        for u in tqdm(todo, desc="reasons (users)", disable=not progress):
            rec = _user_record(setup, u, cfg)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            done[u] = rec
    records = [done[u] for u in sample]
    summary = summarise(records, seed)
    summary.update(written_by=setup.author, config=_settings(cfg), seed=seed)
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "report.md").write_text(format_report(summary, records))
    return summary


def format_report(s: dict, records: list[dict], examples: int = 5) -> str:
    def cell(k):
        return f"{s[k]['mean']:.3f} [{s[k]['ci95'][0]:.3f}, {s[k]['ci95'][1]:.3f}]"
    c = s["cost"]
    lines = [
        "# Recommendation reasons: teacher vs the student's supporting items", "",
        f"{s['users']} seeded test users (seed {s['seed']}), the student's top-{TOP} each: {s['reasons']} reasons.",
        f"Reasons written by: {s['written_by']}. Settings: {s['config']}.", "",
        "| measure (share of reasons, mean over users, 95% bootstrap CI) | value |", "|---|---|",
        f"| teacher names one of the student's {TOP} supporting items, item space | {cell('agree_item')} |",
        f"| the same, text space | {cell('agree_text')} |",
        f"| baseline: {TOP} random history items (exact expectation) | {cell('random')} |",
        f"| reference: the {TOP} most recent history items | {cell('recent')} |",
        f"| reasons that name a history item at all | {cell('named')} |",
        f"| ratio agreement / baseline, item space | {s['ratio_item']['mean']:.2f} "
        f"[{s['ratio_item']['ci95'][0]:.2f}, {s['ratio_item']['ci95'][1]:.2f}] |",
        f"| ratio agreement / baseline, text space | {s['ratio_text']['mean']:.2f} "
        f"[{s['ratio_text']['ci95'][0]:.2f}, {s['ratio_text']['ci95'][1]:.2f}] |", "",
        f"Cost: {c['seconds_per_reason']} s per reason ({c['seconds_per_user']} s per user of {TOP} reasons, one "
        f"shared prefix of {c['prefix_tokens_mean']} tokens), {c['generated_tokens_per_reason']} generated tokens "
        f"per reason, {c['generated_tokens_per_s']} generated tokens/s.", "", "## Examples", ""]
    for rec in records[:examples]:
        for j, sentence in enumerate(rec["reasons"]):
            lines.append(f"- user {rec['user']}, item {rec['recs'][j]}: {sentence} — student (item space): "
                         f"{', '.join(rec['support']['item'][j])}")
    return "\n".join(lines) + "\n"
