"""How the pipeline's cost grows with the log: data, cache, student epoch and export at 10^5..10^7 interactions.

    distillrec growth --sizes 1e5,1e6,1e7 --out runs/growth

For every size N a seeded synthetic log (`distill.synth`: the catalog fixed at --items, users growing with N at
--per-user interactions each) gets a run folder on the tiny preset (a random 2-layer Llama as the teacher: the
point is how the pipeline's own work grows, not the LLM's FLOPs, which are linear in tokens by construction). Each
stage runs in its own process, so its peak RSS is its own (ru_maxrss), above the process's RSS after imports:

    data      load the log (columns only) -> factorize -> CSR sequences -> leave-last-out split
    cache     label the training positions of the cached users with the teacher (teacher.cache_users users:
              --cache-share of them, so labelling stays affordable at 10^7; its cost is per labelled position)
    student   one epoch: one pass over every training window + the validation NDCG@10 of every user
    export    ONNX export of the student (single graph, two parts, item table) with parity checks

The report tabulates seconds and peak memory per stage and size, per interaction (per labelled position for the
cache), and the log-log slope of time and of memory above the baseline against N fitted over the sizes (1 = cost
per interaction flat), and plots them (growth.png). The teacher stage (a few steps on a handful of users, and the
item-text vectors of the fixed catalog) runs first and is not part of the growth.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STAGES = ("data", "cache", "student", "export")

TARGET_SLOPE = 1.1
"""The issue's targets: each stage's time grows at most like N^1.1 (data + split, cache, student epoch)."""
DATA_PEAK_GB_AT_1E7 = 4.0
"""... and the data stage reads 10^7 interactions within 4 GB peak RSS."""


# ----------------------------------------------------------------------------- one stage, in its own process
def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: Linux carries that over fork + exec, so a stage process
    would report its parent's peak whenever that was higher."""
    return _status_mb("VmHWM")


def _stage(name: str, run_dir: str) -> dict:
    """Run one stage on the run folder; {seconds, peak_mb, base_mb, ...} (timed after the imports)."""
    import torch

    from distill.data import Split, load_dataset

    from .cli import _config_for_run
    cfg = _config_for_run(run_dir, [])
    if name == "data":
        base = _rss_mb()
        t0 = time.perf_counter()
        ds = load_dataset(cfg.data)
        split = Split.leave_last_out(ds)
        out = dict(seconds=time.perf_counter() - t0, users=ds.n_users, items=ds.n_items,
                   interactions=int(ds.items.offsets[-1]), train_positions=int(split.n_train.sum()))
    elif name == "cache":
        from distill.cache import build_cache
        import shutil
        shutil.rmtree(Path(run_dir) / "teacher_cache", ignore_errors=True)
        base = _rss_mb()
        t0 = time.perf_counter()
        man = build_cache(cfg)
        out = dict(seconds=time.perf_counter() - t0, labelled=man["rows"], users=man["users"],
                   labelling_seconds=man["labelling"]["seconds"], tokens=man["labelling"]["tokens"])
    elif name == "student":
        from distill.cache import load_cache
        from distill.common import set_seed
        from distill.student_stage import _setup, _train_epoch, val_ndcg10
        from distill.windows import epoch_batches
        ds = load_dataset(cfg.data)
        split = Split.leave_last_out(ds)
        base = _rss_mb()
        t0 = time.perf_counter()
        set_seed(cfg.seed)
        cache = load_cache(Path(run_dir), ds.data_hash)
        t = _setup(cfg.student, split, cache, True, "cpu", None)
        t1 = time.perf_counter()
        _, steps = _train_epoch(t, epoch_batches(t.budget.windows, cfg.student.batch_size, np.random.default_rng(0)),
                                0, 0, None)
        t2 = time.perf_counter()
        ndcg = val_ndcg10(t.student, split)
        t3 = time.perf_counter()
        out = dict(seconds=t3 - t0, setup_seconds=t1 - t0, train_seconds=t2 - t1, val_seconds=t3 - t2,
                   steps=steps, windows=t.budget.windows, val_ndcg10=ndcg)
        # the export stage reads a student folder: saved like the student stage saves one (no test evaluation)
        student = t.student.eval()
        student.cpu().save(Path(run_dir) / "student", extra=dict(
            item_ids=[str(i) for i in ds.item_ids], like_threshold=ds.like_threshold, max_history=cfg.student.max_len,
            item_popularity=split.train_item_counts(include_val=True).tolist(), data_hash=ds.data_hash, kd=True))
    elif name == "export":
        from export.onnx_export import export_run

        from .cli import _training_histories
        base = _rss_mb()
        t0 = time.perf_counter()
        summary = export_run(Path(run_dir), cfg.export, seed=cfg.seed, calibration=_training_histories(cfg))
        out = dict(seconds=time.perf_counter() - t0, files=sorted(summary) if isinstance(summary, dict) else None)
    else:
        raise ValueError(f"unknown stage {name!r}; one of {STAGES}")
    out.update(stage=name, base_mb=base, peak_mb=_peak_mb(), torch_threads=torch.get_num_threads())
    return out


# ----------------------------------------------------------------------------- the sweep
def _prepare(n: int, items: int, per_user: int, cache_share: float, out: Path, seed: int) -> Path:
    """The synthetic log and a run folder with a trained tiny teacher for size n."""
    from distill.synth import SynthSpec, write_synth
    from distill.teacher_stage import train_teacher

    from .cli import _start_run
    folder = out / f"n{n:.0e}".replace("+", "")
    log = folder / "log.parquet"
    users = max(1, n // per_user)
    if not log.exists():
        write_synth(SynthSpec(users=users, items=items, interactions=n, seed=seed), log)
    run = folder / "run"
    if not (run / "teacher" / "heads.safetensors").exists():
        cache_users = max(1, int(round(cache_share * users)))
        cfg = _start_run("tiny", ["data.source=parquet", f"data.path={log}",
                                  f"data.items_path={folder / 'log.items.parquet'}", "data.item_text_cols=[title]",
                                  "teacher.train_users=8", "teacher.eval_users=8", "teacher.val_users=8",
                                  "teacher.max_steps=2", f"teacher.cache_users={cache_users}",
                                  "teacher.cache_shard_users=4096", f"seed={seed}",
                                  # 2*10^4 items: the full softmax's [positions, items] logits dominate a step
                                  # (1 GB per 256-window batch); the sampled softmax is the large-catalog setting
                                  "student.next_item_loss=sampled"], run_dir=run)
        train_teacher(cfg)
    return run


def run_stage(name: str, run: Path, threads: int) -> dict:
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "distillrec.growth", "--stage", name, str(run)], env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"stage {name} on {run} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def fit_slope(n, y) -> float:
    """Least-squares slope of log(y) on log(n)."""
    n, y = np.asarray(n, float), np.asarray(y, float)
    ok = (n > 0) & (y > 0)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(n[ok]), np.log(y[ok]), 1)[0])


def sweep(sizes, items: int, per_user: int, cache_share: float, out: Path, threads: int, seed: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in sizes:
        run = _prepare(int(n), items, per_user, cache_share, out, seed)
        for stage in STAGES:
            r = run_stage(stage, run, threads)
            r["n"] = int(n)
            rows.append(r)
            print(json.dumps(r), flush=True)
    report = dict(sizes=[int(n) for n in sizes], items=items, per_user=per_user, cache_share=cache_share,
                  threads=threads, rows=rows, slopes=slopes(rows), machine=_machine())
    (out / "growth.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    plot(report, out / "growth.png")
    return report


def _work(r: dict) -> int:
    """The stage's unit of work: labelled positions for the cache, interactions otherwise."""
    return r.get("labelled", r["n"]) if r["stage"] == "cache" else r["n"]


def slopes(rows: list) -> dict:
    out = {}
    for stage in STAGES:
        rs = [r for r in rows if r["stage"] == stage]
        work = [_work(r) for r in rs]
        out[stage] = dict(time=fit_slope(work, [r["seconds"] for r in rs]),
                          memory=fit_slope(work, [max(r["peak_mb"] - r["base_mb"], 1e-3) for r in rs]),
                          # the two largest sizes alone: fixed costs (imports aside: loading the teacher, building
                          # the model) flatten the slope at the small end
                          time_top=fit_slope(work[-2:], [r["seconds"] for r in rs[-2:]]))
        if stage == "student":
            out[stage]["train_pass"] = fit_slope(work, [r["train_seconds"] for r in rs])
        if stage == "cache":
            out[stage]["labelling"] = fit_slope(work, [r["labelling_seconds"] for r in rs])
    return out


def markdown(report: dict) -> str:
    lines = [f"# Cost growth: {report['items']:,} items, {report['per_user']} interactions per user, "
             f"cache on {report['cache_share']:.0%} of users, {report['threads']} threads",
             "", "Each stage in its own process; memory = peak RSS, and above the RSS after imports.", "",
             "| stage | interactions | work | seconds | µs / unit | peak MB | above base MB | bytes / unit |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        w = _work(r)
        above = r["peak_mb"] - r["base_mb"]
        lines.append(f"| {r['stage']} | {r['n']:,} | {w:,} | {r['seconds']:.2f} | {r['seconds'] / w * 1e6:.2f} | "
                     f"{r['peak_mb']:.0f} | {above:.0f} | {above * 2**20 / w:.0f} |")
    lines += ["", "Log-log slope against the work (1.0 = cost per unit flat; target for time <= "
              f"{TARGET_SLOPE}):", "", "| stage | time slope, all sizes | time slope, two largest | memory slope |",
              "|---|---:|---:|---:|"]
    for stage, s in report["slopes"].items():
        extra = (f" (training pass alone: {s['train_pass']:.2f})" if "train_pass" in s else
                 f" (labelling alone: {s['labelling']:.2f})" if "labelling" in s else "")
        lines.append(f"| {stage} | {s['time']:.2f}{extra} | {s['time_top']:.2f} | {s['memory']:.2f} |")
    data_top = [r for r in report["rows"] if r["stage"] == "data" and r["n"] == max(report["sizes"])]
    if data_top:
        lines += ["", f"Data stage at {data_top[0]['n']:,} interactions: {data_top[0]['peak_mb'] / 1024:.2f} GB peak "
                  f"RSS (target <= {DATA_PEAK_GB_AT_1E7} GB at 10^7)."]
    stu = [r for r in report["rows"] if r["stage"] == "student"]
    if stu:
        lines += ["", "Student epoch split (seconds): " + "; ".join(
            f"{r['n']:,}: setup {r['setup_seconds']:.1f}, train {r['train_seconds']:.1f} ({r['steps']} steps), "
            f"validation {r['val_seconds']:.1f}" for r in stu)]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage in STAGES:
        rs = [r for r in report["rows"] if r["stage"] == stage]
        w = [_work(r) for r in rs]
        s = report["slopes"][stage]
        axes[0].loglog(w, [r["seconds"] for r in rs], "o-", label=f"{stage} (slope {s['time']:.2f})")
        axes[1].loglog(w, [r["peak_mb"] for r in rs], "o-", label=f"{stage} (slope above base {s['memory']:.2f})")
    axes[0].set(xlabel="interactions (cache: labelled positions)", ylabel="seconds", title="time per stage")
    axes[1].set(xlabel="interactions (cache: labelled positions)", ylabel="peak RSS (MB)", title="peak memory per stage")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _machine() -> dict:
    from distill.machine import machine_info
    return machine_info()


def main(argv=None) -> int:
    """`python -m distillrec.growth --stage NAME RUN`: one stage in this process (what `sweep` starts); the sweep
    itself is `distillrec growth`."""
    p = argparse.ArgumentParser(prog="python -m distillrec.growth")
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("run")
    a = p.parse_args(argv)
    print(json.dumps(_stage(a.stage, a.run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
