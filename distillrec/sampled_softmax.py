"""Full vs sampled softmax for the student's next_item loss (student.next_item_loss): quality and training cost.

    python -m distillrec.sampled_softmax [--out runs/sampled_softmax/] [--epochs 15] [--seeds 0 1 2]

1. ML-100K quality: the KD student of `--config` (configs/cpu.yaml's student section, as `distillrec student`
   builds it) trained by distill.student_stage.fit_student on the cached teacher of `--run` (read only), once per
   seed and variant, and scored on the test split like train_student (evaluate_predictions: NDCG@10, HR@10 over
   all evaluated users). Variants (VARIANTS): `full` = the full softmax with the KL on the teacher's top-K (the
   same KD the sampled loss can use, so only the next_item softmax differs), `sampled_popularity`,
   `sampled_uniform` (M = student.sampled_negatives or --negatives); `full_catalog` (the config's own
   full-catalog KL) and `sampled_popularity_m128` are optional rows. Every fit runs `--epochs` epochs (the cosine
   schedule ends there; early stopping as configured; 10 by default, not the ablation's 15, to keep the 9 fits at
   ~20 min); the fits are interleaved (seed by seed, the variant order rotated) so that a job sharing the machine
   slows every variant alike.
2. Training step cost on ML-100K: `--step-rounds` rounds, each timing one optimizer step of every variant
   (distill.student_stage._train_step, the stage's own step) in turn; medians and ratios to `full`.
3. Synthetic large catalog: the same student with `--synthetic-items` items (random text vectors, Zipf training
   counts, random teacher top-K), one step of `--synthetic-batch` full windows (every position labelled), timed
   interleaved: full vs sampled. Random tensors: a cost measurement only.

Writes <out>/report.json and <out>/report.md. The machine may be shared: compare the ratios, which are measured
within one run and interleaved, rather than the absolute seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = {
    "full": ("full softmax, KL on the teacher top-K", dict(kd_scope="topk")),
    "sampled_popularity": ("sampled, popularity q + logQ", dict(next_item_loss="sampled", sampler="popularity")),
    "sampled_uniform": ("sampled, uniform q + logQ", dict(next_item_loss="sampled", sampler="uniform")),
    "sampled_popularity_m128": ("sampled, popularity q + logQ, M = 128",
                                dict(next_item_loss="sampled", sampler="popularity", sampled_negatives=128)),
    "full_catalog": ("full softmax, full-catalog KL (the config's KD)", dict(kd_scope="catalog")),
}
"""key -> (label, StudentConfig overrides on the config's student section)."""
DEFAULT_VARIANTS = ["full", "sampled_popularity", "sampled_uniform"]


def _student_config(base, key: str, epochs: int, negatives):
    from dataclasses import replace
    over = dict(VARIANTS[key][1])
    if negatives and over.get("next_item_loss") == "sampled" and "sampled_negatives" not in over:
        over["sampled_negatives"] = int(negatives)
    return replace(base, epochs=int(epochs), **over)


def _metric(m: dict, name: str) -> float:
    return float(m["next_item"][name]["value"])


def _load(config: str, run: str):
    from distill.cache import load_cache
    from distill.config import load_config
    from distill.data import Split, load_dataset
    cfg = load_config(config)
    ds = load_dataset(cfg.data)
    split = Split.leave_last_out(ds)
    cache = load_cache(Path(run), ds.data_hash)  # read only: nothing is written into the run
    return cfg, split, cache


def quality(cfg, split, cache, variants, seeds, epochs, negatives, log=print) -> list[dict]:
    """One KD student per (seed, variant), interleaved; test NDCG@10 / HR@10 and the training time of each."""
    from distill.evaluation import evaluate_predictions
    from distill.student_stage import fit_student, student_predict
    rows = []
    for i, seed in enumerate(seeds):
        order = variants[i % len(variants):] + variants[:i % len(variants)]
        for key in order:
            sc = _student_config(cfg.student, key, epochs, negatives)
            fit = fit_student(sc, split, cache, use_teacher=True, seed=seed, device="cpu", desc=key)
            pred = student_predict(fit.student, split, split.eval_users, "test")
            m = evaluate_predictions(pred, split, "test", n_boot=200, seed=seed)
            epochs_run = len(fit.history)
            row = dict(variant=key, seed=seed, ndcg10=_metric(m, "NDCG@10"), hr10=_metric(m, "HR@10"),
                       best_epoch=fit.best_epoch, best_val_ndcg10=fit.best_val_ndcg10, epochs_run=epochs_run,
                       steps=fit.steps, stop_reason=fit.stop_reason, train_seconds=fit.train_seconds,
                       seconds_per_epoch=fit.train_seconds / max(1, epochs_run),
                       components=fit.components)
            rows.append(row)
            log(f"[{key} seed {seed}] test NDCG@10 {row['ndcg10']:.4f} HR@10 {row['hr10']:.4f} "
                f"{epochs_run} epochs {fit.train_seconds:.0f} s")
    return rows


def _time_steps(trainings: dict, next_idx: dict, rounds: int) -> dict:
    """Round-robin: every round times one optimizer step of every variant; {variant: [seconds]}."""
    from distill.student_stage import _train_step
    times = {k: [] for k in trainings}
    for k, t in trainings.items():  # warm-up step (allocator, first-call overheads)
        t.student.train()
        _train_step(t, next_idx[k]())
    for _ in range(rounds):
        for k, t in trainings.items():
            idx = next_idx[k]()
            t0 = time.perf_counter()
            _train_step(t, idx)
            times[k].append(time.perf_counter() - t0)
    return times


def _summary(times: dict, ref: str) -> dict:
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {k: dict(median_s=med[k], ratio_to_full=med[k] / med[ref], samples=[round(x, 4) for x in times[k]])
            for k in times}


def step_cost_ml100k(cfg, split, cache, variants, rounds: int, negatives) -> dict:
    """Seconds per optimizer step of each variant on ML-100K (batch of the config), interleaved."""
    import torch

    from distill.student_stage import _setup
    from distill.windows import epoch_batches
    trainings, nxt = {}, {}
    for key in variants:
        torch.manual_seed(0)
        t = _setup(_student_config(cfg.student, key, cfg.student.epochs, negatives), split, cache, True, "cpu", None)
        batches = epoch_batches(len(t.arrays["items"]), t.budget.batch_size, np.random.default_rng(0))
        trainings[key], nxt[key] = t, (lambda b=batches: next(b)[1])
    out = _summary(_time_steps(trainings, nxt, rounds), variants[0])
    n_items, p = split.ds.n_items, int(trainings[variants[0]].arrays["labelled"].sum(1).mean() * cfg.student.batch_size)
    return dict(n_items=n_items, batch_size=cfg.student.batch_size, approx_labelled_positions=p, variants=out)


def _synthetic_step(student, objective, weighting, opt, batch: dict) -> None:
    """One single-process optimizer step as distill.student_stage._train_step takes it (forward at the labelled
    positions, objective, loss weighting + alignment, backward, clipping, AdamW), on a ready batch."""
    import torch
    out = student.forward_positions(batch["items"], batch["ratings"], batch["length"], select=batch["labelled"],
                                    catalog=not objective.sampled)
    losses, align, _ = objective(out, batch)
    total, _ = weighting(losses)
    if align is not None:
        total = total + align
    opt.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()


def step_cost_synthetic(cfg, n_items: int, batch: int, rounds: int, negatives, text_dim: int, top_k: int,
                        seed: int = 0) -> dict:
    """One training step at n_items items with random inputs (Zipf item draws, random teacher top-K and text
    vectors), full vs sampled, interleaved round by round: {variant: median seconds, ratio to full}."""
    from dataclasses import replace

    import torch

    from distill.losses import DistillationObjective
    from distill.student import Student
    from distill.weighting import build_weighting
    g = np.random.default_rng(seed)
    tasks = ["next_item", "rating", "like"]
    L = cfg.student.max_len
    counts = np.floor(1e6 / np.arange(1, n_items + 1) ** 1.07).astype(np.int64)[g.permutation(n_items)]  # Zipf
    pop = counts / counts.sum()
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    b = dict(items=t(g.choice(n_items, size=(batch, L), p=pop)),
             ratings=t(g.integers(1, 6, (batch, L)).astype(np.float32)),
             length=torch.full((batch,), L), labelled=torch.ones(batch, L, dtype=torch.bool),
             has_teacher=torch.ones(batch, L, dtype=torch.bool),
             t_items=t(g.choice(n_items, size=(batch, L, top_k), p=pop)),
             t_logits=-torch.sort(-t(g.standard_normal((batch, L, top_k)).astype(np.float32)), dim=-1).values,
             t_rating=torch.full((batch, L), 3.5), t_like=torch.zeros(batch, L),
             t_user=t(g.standard_normal((batch, L, 128)).astype(np.float32)))
    text = t(g.standard_normal((n_items, text_dim)).astype(np.float32))
    variants = {"full": dict(kd_scope="topk"),
                "sampled_popularity": dict(next_item_loss="sampled", sampler="popularity",
                                           **({"sampled_negatives": int(negatives)} if negatives else {}))}
    models, m = {}, None
    for key, over in variants.items():
        sc = replace(cfg.student, **over)
        torch.manual_seed(seed)
        student = Student(sc, n_items, tasks, text_vectors=text).train()
        objective = DistillationObjective(sc, tasks, sc.dim, use_teacher=True, teacher_dim=128, n_items=n_items,
                                          item_counts=t(counts))
        weighting = build_weighting(sc.weighting, tasks, sc.loss_weights)
        opt = torch.optim.AdamW(list(student.parameters()) + list(objective.parameters()), lr=sc.lr)
        models[key] = (student, objective, weighting, opt)
        m = objective.sampler.m if objective.sampled else m
    times = {k: [] for k in models}
    for k, parts in models.items():  # warm-up
        _synthetic_step(*parts, b)
    for _ in range(rounds):
        for k, parts in models.items():
            t0 = time.perf_counter()
            _synthetic_step(*parts, b)
            times[k].append(time.perf_counter() - t0)
    p = batch * L
    return dict(n_items=n_items, batch_windows=batch, labelled_positions=p, text_dim=text_dim, teacher_top_k=top_k,
                sampled_negatives=m, full_logits_mb=p * n_items * 4 / 2 ** 20,
                sampled_logits_mb=p * (m + 1 + top_k) * 4 / 2 ** 20, variants=_summary(times, "full"))


def _mean_std(x) -> tuple[float, float]:
    x = np.asarray(x, dtype=float)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def summarise(rows: list[dict], variants: list[str]) -> dict:
    out = {}
    for key in variants:
        rs = [r for r in rows if r["variant"] == key]
        if not rs:
            continue
        out[key] = dict(label=VARIANTS[key][0], seeds=[r["seed"] for r in rs],
                        ndcg10=_mean_std([r["ndcg10"] for r in rs]), hr10=_mean_std([r["hr10"] for r in rs]),
                        ndcg10_per_seed=[round(r["ndcg10"], 4) for r in rs],
                        seconds_per_epoch=_mean_std([r["seconds_per_epoch"] for r in rs]),
                        epochs_run=[r["epochs_run"] for r in rs], stop_reasons=sorted({r["stop_reason"] for r in rs}))
    ref = out.get(variants[0])
    if ref:
        for v in out.values():
            v["epoch_time_ratio_to_full"] = v["seconds_per_epoch"][0] / ref["seconds_per_epoch"][0]
    return out


def markdown(report: dict) -> str:
    a = report["args"]
    lines = ["# Full vs sampled softmax (student.next_item_loss)", "",
             f"`{report['command']}`", "",
             f"ML-100K KD student of `{a['config']}` on the cached teacher of `{a['run']}`; seeds {a['seeds']}, "
             f"{a['epochs']} epochs per fit (cosine schedule to there); test split, all evaluated users. "
             "s/epoch includes the per-epoch validation; step times are medians of interleaved rounds "
             f"(load average at start / end: {report['loadavg_start']} / {report['loadavg_end']}).", ""]
    q, s = report.get("quality"), report.get("steps_ml100k")
    if q:
        lines += ["| variant | NDCG@10 (mean ± std) | per seed | HR@10 (mean ± std) | s/epoch | epoch time / full | "
                  "s/step (interleaved) | step time / full |", "|---|---|---|---|---|---|---|---|"]
        for key, v in q.items():
            st = (s or {}).get("variants", {}).get(key)
            lines.append(f"| {v['label']} | {v['ndcg10'][0]:.4f} ± {v['ndcg10'][1]:.4f} | "
                         f"{' / '.join(f'{x:.4f}' for x in v['ndcg10_per_seed'])} | "
                         f"{v['hr10'][0]:.4f} ± {v['hr10'][1]:.4f} | {v['seconds_per_epoch'][0]:.1f} | "
                         f"{v['epoch_time_ratio_to_full']:.2f} | "
                         + (f"{st['median_s']:.3f} | {st['ratio_to_full']:.2f} |" if st else "– | – |"))
        lines.append("")
    elif s:
        lines += [f"ML-100K training step ({s['n_items']:,} items, batch {s['batch_size']}):", "",
                  "| variant | s/step (interleaved median) | / full |", "|---|---|---|"]
        lines += [f"| {VARIANTS[k][0]} | {v['median_s']:.3f} | {v['ratio_to_full']:.2f} |"
                  for k, v in s["variants"].items()]
        lines.append("")
    syn = report.get("steps_synthetic")
    if syn:
        lines += [f"Synthetic catalog: {syn['n_items']:,} items, {syn['batch_windows']} windows x "
                  f"{syn['labelled_positions'] // syn['batch_windows']} labelled positions = "
                  f"{syn['labelled_positions']:,} positions per step, text vectors of {syn['text_dim']}, teacher "
                  f"top-{syn['teacher_top_k']}, M = {syn['sampled_negatives']} (random tensors):", "",
                  "| variant | s/step (median) | / full | next_item logits |", "|---|---|---|---|"]
        for key, v in syn["variants"].items():
            mb = syn["full_logits_mb"] if key == "full" else syn["sampled_logits_mb"]
            lines.append(f"| {key} | {v['median_s']:.3f} | {v['ratio_to_full']:.3f} | {mb:,.0f} MB |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m distillrec.sampled_softmax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cpu.yaml", help="run config whose student section is trained")
    p.add_argument("--run", default="runs/cpu-default", help="run whose teacher cache is read (never written)")
    p.add_argument("--out", default="runs/sampled_softmax/", help="folder of report.json and report.md")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                   help="the first is the reference of the ratios")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10,
                   help="epochs per fit (the ablation's 15: 9 fits take ~30 min at one thread on 2 shared cores; "
                        "10: ~19 min)")
    p.add_argument("--negatives", type=int, default=None, help="M of the sampled variants (default: the config's)")
    p.add_argument("--step-rounds", type=int, default=8, help="interleaved rounds of the ML-100K step timing")
    p.add_argument("--synthetic-items", type=int, default=100_000, help="0 = skip the synthetic catalog")
    p.add_argument("--synthetic-batch", type=int, default=64, help="windows per synthetic step (full ones)")
    p.add_argument("--synthetic-rounds", type=int, default=3)
    p.add_argument("--skip-quality", action="store_true", help="only the step timings")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: stable timings when another job shares the cores; 0 = torch's)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cli = argv if argv is not None else sys.argv[1:]
    report = dict(command="python -m distillrec.sampled_softmax " + " ".join(cli),
                  args=vars(args), loadavg_start=[round(x, 2) for x in os.getloadavg()])
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    report["torch_threads"] = torch.get_num_threads()
    cfg, split, cache = _load(args.config, args.run)
    report["steps_ml100k"] = step_cost_ml100k(cfg, split, cache, args.variants, args.step_rounds, args.negatives)
    if args.synthetic_items:
        report["steps_synthetic"] = step_cost_synthetic(cfg, args.synthetic_items, args.synthetic_batch,
                                                        args.synthetic_rounds, args.negatives,
                                                        text_dim=int(cache["item_vectors"].shape[1]),
                                                        top_k=int(cache["next_topk_items"].shape[1]))
    if not args.skip_quality:
        rows = quality(cfg, split, cache, args.variants, args.seeds, args.epochs, args.negatives)
        report["runs"] = rows
        report["quality"] = summarise(rows, args.variants)
    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_seconds"] = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
