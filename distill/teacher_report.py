"""Teacher report (teacher/report.md) and the loss-weighting comparison at one budget.

    distillrec teacher-weighting runs/<name> [--steps N] [--eval-users M]

trains one teacher per strategy (fixed, uncertainty, gradnorm, dwa) with the same data, seed, steps and
evaluation users, each in runs/<name>/weighting/<strategy>/, and writes teacher/weighting.json; the
teacher report folds it in.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

import numpy as np

from .config import RunConfig
from .data import Split, load_dataset
from .io import atomic_write_text, write_json
from .metrics import format_metrics_table

STRATEGIES = ("fixed", "uncertainty", "gradnorm", "dwa")


def compare_weightings(cfg: RunConfig, strategies=STRATEGIES, steps: Optional[int] = None,
                       eval_users: Optional[int] = None) -> dict:
    from .teacher_stage import train_teacher
    rows, budget = {}, None
    for name in strategies:
        c = copy.deepcopy(cfg)
        c.out_dir, c.name = str(Path(cfg.run_dir) / "weighting"), name
        c.teacher.weighting = name
        c.teacher.val_every = 0
        if steps is not None:
            c.teacher.max_steps = steps
        if eval_users is not None:
            c.teacher.eval_users = eval_users
        rep = train_teacher(c)
        log = [json.loads(x) for x in (Path(c.run_dir) / "teacher" / "train_log.jsonl").read_text().splitlines()]
        rows[name] = dict(metrics=rep["metrics"], final_weights=log[-1]["weights"] if log else {},
                          final_losses=log[-1]["losses"] if log else {}, steps=rep["budget"]["steps"],
                          train_seconds=rep["cost"]["train_seconds"])
        budget = dict(steps=rep["budget"]["steps"], eval_users=rep["eval_users"], train_users=rep["budget"]["train_users"],
                      stop_reason=rep["budget"]["stop_reason"])
    out = dict(strategies=list(strategies), budget=budget, rows=rows, seed=cfg.seed)
    write_json(Path(cfg.run_dir) / "teacher" / "weighting.json", out)
    write_teacher_report(cfg)
    return out


def _weighting_table(w: dict) -> str:
    lines = ["| strategy | NDCG@10 | HR@10 | RMSE | AUC | final weights (next_item / rating / like) | train s |",
             "|---|---|---|---|---|---|---|"]
    def cell(m, task, key):
        if task not in m:
            return "–"
        v = m[task][key]
        return f"{v['value']:.4f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]"

    for name, r in w["rows"].items():
        m = r["metrics"]
        weights = " / ".join(f"{r['final_weights'].get(t, float('nan')):.2f}" for t in ("next_item", "rating", "like"))
        lines.append(f"| {name} | {cell(m, 'next_item', 'NDCG@10')} | {cell(m, 'next_item', 'HR@10')} | "
                     f"{cell(m, 'rating', 'RMSE')} | {cell(m, 'like', 'AUC')} | {weights} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def write_teacher_report(cfg: RunConfig) -> Path:
    """teacher/report.md: protocol quality with CIs next to the baselines on the same users, the budget,
    tokens per dataset token, labelling throughput (when the cache exists) and the weighting table."""
    from .baselines import evaluate_baselines
    run = Path(cfg.run_dir)
    tdir = run / "teacher"
    rep = json.loads((tdir / "metrics.json").read_text())
    ds = load_dataset(cfg.data)
    split = Split.leave_last_out(ds)
    with np.load(tdir / "test_predictions.npz") as z:
        users = z["users"]
    rows = {"teacher": rep["metrics"], **evaluate_baselines(split, "test", users, seed=cfg.seed)}
    b, c = rep["budget"], rep["cost"]
    lines = [
        "# Teacher report", "",
        f"Base LM: `{cfg.teacher.model}`{' (' + cfg.teacher.gguf_file + ')' if cfg.teacher.gguf_file else ''}, "
        f"input `{cfg.teacher.input}`, {cfg.teacher.layers or 'all'} decoder layers; "
        + (f"loaded from `{rep['source']['folder']}` (trained by `{rep['source']['command']}`, "
           f"{rep['source']['wall_seconds'] / 60:.0f} min; the budget below is that training's), evaluated in this run; "
           if rep.get("source") else "") +
        f"LoRA r={cfg.teacher.lora_r}, alpha={cfg.teacher.lora_alpha}, targets {cfg.teacher.target_modules}, "
        f"last {cfg.teacher.lora_last_layers or 'all'} layers; loss weighting `{rep.get('weighting', cfg.teacher.weighting)}`; "
        f"device {rep['device']}; seed {rep['seed']}.", "",
        f"## Quality on the protocol's test split ({len(users)} users, 95% bootstrap CIs over users)", "",
        format_metrics_table(rows), "",
        "## Budget and cost", "",
        f"- training users {b['train_users']} ({b['windows']} windows), {b['steps']} optimizer steps of "
        f"{b['batch_size']} x {b.get('grad_accum', 1)} windows x {b.get('world_size', 1)} ranks; stopped by {b['stop_reason']} "
        f"(max {b['max_steps']} steps / {b['time_budget_s']} s); best step {b.get('best_step')}; "
        f"item vectors re-read by the tuned LM {b.get('item_vector_refreshes', 0)} time(s) (once per epoch boundary)",
        f"- LLM tokens processed per dataset token (one epoch of windows vs each history written once): "
        f"**{c['llm_tokens_per_dataset_token']:.3f}** (target <= 1.2)",
        f"- training throughput {c['train_tokens_per_s']:.0f} tokens/s; evaluation {c['eval_users_per_s']:.2f} users/s "
        f"(history <= {b['eval_history']})",
        f"- parameters: {rep['params']['total']:,} total, {rep['params']['lora_trainable']:,} LoRA-trainable, "
        f"{rep['params']['heads']:,} in the heads",
    ]
    if b.get("plan"):  # the stage's whole-stage budget split, stated before training (distill/budget.py)
        p = b["plan"]
        lines.append(f"- time budget {p['budget_s']:.0f} s for the whole stage: {p['spent_s']:.1f} s model + item vectors, "
                     f"~{p['after_s']:.1f} s evaluation estimated before training (took {c['eval_seconds']:.1f} s), "
                     f"{p['train_s']:.1f} s left for training; the stage took {b.get('stage_seconds', float('nan')):.1f} s"
                     + (f" (**the fixed work alone exceeded the budget by ~{p['over_s']:.0f} s**)" if p["over_s"] else ""))
    man_path = run / "teacher_cache" / "manifest.json"
    if man_path.exists():
        lab = json.loads(man_path.read_text())["labelling"]
        lines.append(f"- labelling (cache): {lab['interactions']:,} positions in {lab['seconds']:.0f} s = "
                     f"**{lab['interactions_per_s']:.1f} interactions/s** ({lab['tokens_per_s']:.0f} tokens/s)"
                     + (f"; estimated {lab['estimated_seconds']:.0f} s before it started" if "estimated_seconds" in lab
                        else ""))
    w_path = tdir / "weighting.json"
    if w_path.exists():
        w = json.loads(w_path.read_text())
        lines += ["", f"## Loss-weighting strategies at the same budget ({w['budget']['steps']} steps, "
                  f"{w['budget']['train_users']} training users, {w['budget']['eval_users']} test users, seed {w['seed']})",
                  "", _weighting_table(w)]
    else:
        lines += ["", "Loss-weighting comparison: not run (`distillrec teacher-weighting <run>`)."]
    path = tdir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def learning_curves(run_dirs: list[Path], out: Path) -> str:
    """Validation NDCG@10 against training CPU minutes for several teacher runs (their train_log.jsonl):
    a Markdown table (returned, also written to `out`.md) and a plot (`out`.png)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = Path(out)
    fig, ax = plt.subplots(figsize=(7, 4))
    lines = ["| run | formulation | step | training min | validation NDCG@10 |", "|---|---|---|---|---|"]
    for run in map(Path, run_dirs):
        tc = json.loads((run / "teacher" / "config.json").read_text())["teacher"]
        form = (f"{tc.get('input', 'text')}, {tc.get('layers') or 'all'} layers, LoRA r={tc['lora_r']} on "
                f"{tc.get('lora_last_layers') or 'all'} layers; validation on {tc.get('val_users') or 'all'} users")
        pts = [json.loads(x) for x in (run / "teacher" / "train_log.jsonl").read_text().splitlines()]
        pts = [p for p in pts if "val_ndcg@10" in p and "train_seconds" in p]
        if not pts:
            continue
        ax.plot([p["train_seconds"] / 60 for p in pts], [p["val_ndcg@10"] for p in pts], marker="o", label=f"{run.name}: {form}")
        lines += [f"| {run.name} | {form} | {p['step']} | {p['train_seconds'] / 60:.1f} | {p['val_ndcg@10']:.4f} |"
                  for p in pts]
    ax.set_xlabel("training CPU minutes (validation excluded)")
    ax.set_ylabel("validation NDCG@10")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)
    table = "\n".join(lines) + "\n"
    atomic_write_text(out.with_suffix(".md"), table)
    return table
