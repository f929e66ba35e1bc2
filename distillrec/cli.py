"""`distillrec` command line: one subcommand per pipeline stage, plus `run` for all of them.

    distillrec run --config cpu                     # a preset (configs/*.yaml) or a YAML file path
    distillrec run --config configs/cpu.yaml        # data -> teacher -> cache -> students -> export -> bench
    distillrec <stage> runs/<name>                  # one stage on an existing run folder (reads its config.yaml)

Stages: data, teacher, cache, student, export, bench. `-o key=value` overrides a config field
(e.g. -o teacher.max_steps=20); values are type-checked against the config dataclasses.

The subcommands are a table (COMMANDS: name -> handler, help, arguments); `main` builds argparse from it.
This module is the only one that imports distill, export and serve_bench together.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from export.batching import DEFAULT_BATCH_MAX, DEFAULT_BATCH_WAIT_MS, DEFAULT_MAX_QUEUE, DEFAULT_RELOAD_CHECK_S

STAGES = ["data", "teacher", "cache", "student", "export", "bench"]


# ----------------------------------------------------------------------------- run folders
def _write_run_config(cfg) -> Path:
    """runs/<name>/config.yaml: the resolved config + provenance (package version, seed, data hash)."""
    import yaml

    from distill.config import META_KEY, config_to_dict
    from distill.data import load_dataset
    from distill.io import atomic_write_text

    from . import __version__
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(cfg.data)
    body = config_to_dict(cfg)
    body[META_KEY] = dict(package_version=__version__, seed=cfg.seed, data_hash=ds.data_hash)
    atomic_write_text(run / "config.yaml", yaml.safe_dump(body, sort_keys=False))
    return run


def _config_for_run(run_dir: str, overrides):
    """The pipeline config of an existing run folder (its config.yaml) with `overrides` applied in memory."""
    import yaml

    from distill.config import ConfigError, apply_overrides

    from .config import config_from_dict
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise SystemExit(f"error: {path} not found; start the run with `distillrec run --config <yaml>` "
                         f"(or `distillrec data --config <yaml>`) first")
    values = yaml.safe_load(path.read_text())
    # no temporary file: every DDP rank parses the same config at once
    try:
        cfg = config_from_dict(apply_overrides(values, overrides))
    except ConfigError as e:
        raise SystemExit(f"error: {path}: {e}") from None
    # the run folder is where the config lives, whatever name/out_dir say
    cfg.out_dir, cfg.name = str(Path(run_dir).parent), Path(run_dir).name
    return cfg


def _start_run(config: str, overrides, run_dir=None):
    """Load a config file or preset, point it at `run_dir` when given, and write the run's config.yaml."""
    from distill.config import ConfigError

    from .config import load_config
    try:
        cfg = load_config(config, overrides)
    except (ConfigError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if run_dir:  # an explicit run folder wins over the config's out_dir/name
        cfg.out_dir, cfg.name = str(Path(run_dir).parent), Path(run_dir).name
    _write_run_config(cfg)
    return cfg


# ----------------------------------------------------------------------------- stages
def stage_data(cfg) -> dict:
    from distill.data import load_dataset
    from distill.io import write_json
    ds = load_dataset(cfg.data)
    stats = ds.stats()
    write_json(Path(cfg.run_dir) / "data_stats.json", stats)
    print(json.dumps(stats, indent=2))
    return stats


def stage_teacher(cfg) -> dict:
    """Train the teacher, or with teacher.init_from load a trained one (checked against its manifest) and
    evaluate it in this run."""
    if cfg.teacher.init_from:
        from distill.shipped import adopt_teacher
        rep = adopt_teacher(cfg)
        print(f"teacher: loaded {rep['source']['folder']} (trained by `{rep['source']['command']}`, "
              f"{rep['source']['wall_seconds'] / 60:.0f} min); evaluated here on {rep['eval_users']} test users")
    else:
        from distill.shipped import write_manifest
        from distill.teacher_stage import train_teacher
        t0 = time.perf_counter()
        rep = train_teacher(cfg)
        if "metrics" in rep:
            from distill.data import load_dataset
            write_manifest(Path(cfg.run_dir) / "teacher", cfg, load_dataset(cfg.data).data_hash,
                           time.perf_counter() - t0, rep["metrics"])
    if "metrics" in rep:  # under torchrun only rank 0 evaluates and reports
        from distill.teacher_report import write_teacher_report
        _print_metrics("teacher", rep["metrics"])
        print(f"teacher report: {write_teacher_report(cfg)}")
    return rep


def stage_cache(cfg) -> dict:
    from distill.cache import build_cache
    from distill.teacher_report import write_teacher_report
    man = build_cache(cfg)
    if "labelling" not in man:  # torchrun / accelerate: rank 0 writes the manifest and reports
        return man
    lab = man["labelling"]
    print(f"teacher cache: {man['rows']} positions of {man['users']} users, "
          f"{lab['interactions_per_s']:.1f} interactions/s; teacher report: {write_teacher_report(cfg)}")
    return man


def stage_student(cfg) -> dict:
    from distill.student_stage import train_student
    out = {}
    for kd in (False, True):  # no-KD first: the KD student's guard (student.kd_guard) compares against it
        rep = train_student(cfg, kd=kd)
        if "metrics" in rep:  # torchrun / accelerate: rank 0 evaluates and reports
            _print_metrics("student" if kd else "student (no KD)", rep["metrics"])
        out["student" if kd else "student_nokd"] = rep
    return out


def _training_histories(cfg) -> tuple[list, list]:
    """The run's training histories (internal ids, ratings or None): calibration data of the static INT8 encoder."""
    from distill.data import Split, load_dataset
    ds = load_dataset(cfg.data)
    sp = Split.leave_last_out(ds)
    users = range(ds.n_users)
    return [sp.train_items(u) for u in users], ([sp.train_ratings(u) for u in users] if ds.has_ratings else None)


def stage_export(cfg) -> dict:
    from export.onnx_export import export_run
    from export.triton import write_run_repository
    summary = export_run(Path(cfg.run_dir), cfg.export, seed=cfg.seed, calibration=_training_histories(cfg))
    summary["triton"] = str(write_run_repository(Path(cfg.run_dir), cfg))
    print(json.dumps(summary, indent=2, default=str))
    return summary


def stage_bench(cfg) -> dict:
    from serve_bench.bench import run_bench
    report = run_bench(cfg)
    print((Path(cfg.run_dir) / "bench" / "report.md").read_text())
    return report


RUNNERS = dict(data=stage_data, teacher=stage_teacher, cache=stage_cache, student=stage_student,
               export=stage_export, bench=stage_bench)


def _print_metrics(name: str, metrics: dict) -> None:
    flat = []
    for task, block in metrics.items():
        if isinstance(block, dict):
            for k, v in block.items():
                if isinstance(v, dict) and "value" in v and k in ("NDCG@10", "HR@10", "RMSE", "AUC"):
                    flat.append(f"{task}/{k}={v['value']:.4f}")
    print(f"[{name}] " + "  ".join(flat))


def run_stages(cfg, stages: list[str]) -> dict:
    """Run `stages` in order on one config (seed reset before each); returns the wall seconds per stage."""
    from distill.common import apply_threads, set_seed
    apply_threads(cfg.threads)
    timings = {}
    for stage in stages:
        set_seed(cfg.seed)
        print(f"==> {stage} ({cfg.run_dir})", flush=True)
        t0 = time.perf_counter()
        RUNNERS[stage](cfg)
        timings[stage] = round(time.perf_counter() - t0, 1)
        print(f"<== {stage} done in {timings[stage]} s", flush=True)
    if len(stages) > 1:
        print(f"stage wall times (s): {timings}; total {sum(timings.values()):.0f} s")
        print(f"report: {Path(cfg.run_dir) / 'bench' / 'report.md'}")
    return timings


# ----------------------------------------------------------------------------- command handlers
def cmd_run(args) -> int:
    from distill.io import write_json
    cfg = _start_run(args.config, args.override)
    timings = run_stages(cfg, STAGES[STAGES.index(args.from_stage):STAGES.index(args.to_stage) + 1])
    # the stage wall times of this run, for `distillrec results` (README figures come from a real run)
    write_json(Path(cfg.run_dir) / "run_timings.json", timings)
    return 0


def cmd_stage(args) -> int:
    """One stage on a run folder; `data --config` starts the folder from a config file."""
    if args.cmd == "data" and args.config:
        cfg = _start_run(args.config, args.override, args.run_dir)
    elif not args.run_dir:
        raise SystemExit(f"error: `distillrec {args.cmd}` needs a run folder (e.g. runs/cpu-default)")
    else:
        cfg = _config_for_run(args.run_dir, args.override)
    run_stages(cfg, [args.cmd])
    return 0


def cmd_teacher_weighting(args) -> int:
    from distill.common import apply_threads
    from distill.teacher_report import compare_weightings
    cfg = _config_for_run(args.run_dir, args.override)
    apply_threads(cfg.threads)
    out = compare_weightings(cfg, args.strategies.split(","), args.steps, args.eval_users)
    print((Path(cfg.run_dir) / "teacher" / "report.md").read_text())
    return 0 if out["rows"] else 1


def cmd_ablate(args) -> int:
    """The student ablation; it writes ablation/report.{json,md}, which the next `distillrec bench` reads."""
    from distill.ablation import report_paths, run_ablation
    from distill.common import apply_threads
    cfg = _config_for_run(args.run_dir, args.override)
    apply_threads(cfg.threads)
    run_ablation(cfg)
    print(report_paths(cfg.run_dir)[1].read_text())
    print("run `distillrec bench` on this run to fold the ablation into bench/report.md")
    return 0


def cmd_teacher_curves(args) -> int:
    from distill.teacher_report import learning_curves
    print(learning_curves([Path(r) for r in args.run_dirs], Path(args.out)))
    return 0


def cmd_ship_teacher(args) -> int:
    from distill.shipped import SHIPPED_DIR, ship_teacher
    print(f"shipped teacher: {ship_teacher(Path(args.run_dir), Path(args.to) if args.to else SHIPPED_DIR)}")
    return 0


def cmd_loadtest(args) -> int:
    from serve_bench.loadtest import run_loadtest
    print(json.dumps(run_loadtest(Path(args.run_dir), clients=args.clients, seconds=args.seconds), indent=2))
    return 0


def cmd_serve(args) -> int:
    from export.service import serve
    serve(Path(args.run_dir) / "onnx", host=args.host, port=args.port, workers=args.workers,
          providers=args.providers, unknown_items=args.unknown_items, empty_history=args.empty_history,
          model_file=args.model_file, batching=not args.no_batching, max_queue=args.max_queue,
          batch_max=args.batch_max, batch_wait_ms=args.batch_wait_ms,
          reload_check_s=None if args.reload_check_s <= 0 else args.reload_check_s, access_log=args.access_log,
          retrieval=args.retrieval)
    return 0


def cmd_results(args) -> int:
    """Snapshot a run's headline numbers to a JSON file and (with --readme) fill the README's results block."""
    from distill.io import write_json

    from .results import ResultsError, snapshot, update_readme
    try:
        snap = snapshot(Path(args.run_dir))
    except ResultsError as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(args.out or f"docs/results/{Path(args.run_dir).name}.json")
    write_json(out, snap)
    print(f"snapshot: {out}")
    if args.readme:
        changed = update_readme(Path(args.readme), snap)
        print(f"{args.readme}: results block {'rewritten' if changed else 'already up to date'}")
    return 0


def cmd_triton(args) -> int:
    from export.triton import write_run_repository
    opts = {k: v for k, v in dict(gpu=args.gpu, max_batch_size=args.max_batch_size, instances=args.instances,
                                  model_file=args.model_file).items() if v is not None}
    print(write_run_repository(Path(args.run_dir), _config_for_run(args.run_dir, []), **opts))
    return 0


def cmd_synth(args) -> int:
    """A synthetic log at any scale (distill/synth.py): Parquet files that data.source=parquet reads."""
    from distill.synth import SynthError, main_args
    try:
        out = main_args(args.users, args.items, args.interactions, args.out, seed=args.seed,
                        overwrite=args.overwrite, topics=args.topics)
    except SynthError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(out, indent=2))
    return 0


def cmd_scale_bench(args) -> int:
    """Two-part serving on synthetic catalogs of growing size (serve_bench/scale.py); not part of `run`."""
    from serve_bench.scale import parse_sizes, run_scale_bench
    run = Path(args.run_dir)
    run_scale_bench(run, parse_sizes(args.sizes), modes=[m.strip() for m in args.modes.split(",")],
                    n_requests=args.requests, history=args.history, seed=args.seed)
    print((run / "bench" / "scale" / "report.md").read_text())
    return 0


def cmd_add_items(args) -> int:
    """Append new items to the served item table (teacher text vectors -> the student's cold-start rows)."""
    from export.item_table import ItemTableError

    from .catalog import CatalogError, add_items
    try:
        out = add_items(Path(args.run_dir), args.items_file, device=args.device)
    except (CatalogError, ValueError, FileNotFoundError, ItemTableError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(out, indent=2))
    print(f"item table version {out['version']} published: running servers reload it (Recommender.reload())")
    return 0


def cmd_growth(args) -> int:
    """Cost growth of data / cache / student epoch / export over synthetic logs of growing size."""
    from .growth import sweep
    sweep([int(float(x)) for x in args.sizes.split(",")], args.items, args.per_user, args.cache_share, Path(args.out),
          args.threads, args.seed)
    print((Path(args.out) / "report.md").read_text())
    return 0


def cmd_remove_items(args) -> int:
    """Take items out of serving (or back in with --reactivate) as a new item table version."""
    from export.item_table import ItemTableError

    from .catalog import CatalogError, remove_items
    try:
        out = remove_items(Path(args.run_dir), args.ids, id_file=args.file, reactivate=args.reactivate)
    except (CatalogError, ValueError, ItemTableError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(out, indent=2))
    return 0


def cmd_explain(args) -> int:
    """One user's reasons (--user), or the agreement study over seeded test users."""
    from distill.reasons import ReasonConfig

    from .explain import ExplainError, explain_user, format_user, reason_study
    cfg = ReasonConfig(history_items=args.history_items, max_new_tokens=args.max_new_tokens, naming=args.naming)
    try:
        if args.user is not None:
            print(format_user(explain_user(Path(args.run_dir), args.user, args.k, cfg, space=args.space)))
            return 0
        reason_study(Path(args.run_dir), users=args.users, seed=args.seed, cfg=cfg)
    except ExplainError as e:
        raise SystemExit(f"error: {e}") from None
    print((Path(args.run_dir) / "reasons" / "report.md").read_text())
    return 0


def cmd_query(args) -> int:
    """Build the query encoder (onnx/query/), choose its weight on validation, evaluate genre queries on test."""
    from .interactive import InteractiveError, query_study
    try:
        query_study(Path(args.run_dir), labels_file=args.labels, seed=args.seed)
    except InteractiveError as e:
        raise SystemExit(f"error: {e}") from None
    print((Path(args.run_dir) / "interactive" / "report.md").read_text())
    return 0


# ----------------------------------------------------------------------------- the table
def arg(*flags: str, **kwargs) -> tuple:
    """One argparse argument: add_argument(*flags, **kwargs)."""
    return flags, kwargs


@dataclass(frozen=True)
class Command:
    handler: Callable[[argparse.Namespace], int]
    """Runs the subcommand; returns the exit status."""
    help: str
    """One line for `distillrec --help`."""
    args: tuple = ()
    """The subcommand's arguments, each made by `arg(...)`."""


OVERRIDE = arg("-o", "--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
               help="override a config field (value parsed as YAML, type-checked); repeatable")
RUN_DIR = arg("run_dir", help="a run folder (runs/<name>) holding config.yaml")


def _stage_command(stage: str) -> Command:
    return Command(cmd_stage, f"run the {stage} stage on an existing run folder",
                   (arg("run_dir", nargs="?", help="a run folder (runs/<name>)"),
                    arg("--config", help="(data stage) start a run folder from a config file or preset"),
                    OVERRIDE))


COMMANDS: dict[str, Command] = {
    "run": Command(cmd_run, "run every stage from a config file", (
        arg("--config", required=True, help="a preset name (cpu, gpu, tiny, ...) or a YAML file"),
        arg("--from-stage", choices=STAGES, default="data", help="skip the stages before this one"),
        arg("--to-stage", choices=STAGES, default="bench", help="stop after this stage"),
        OVERRIDE)),
    **{s: _stage_command(s) for s in STAGES},
    "teacher-weighting": Command(
        cmd_teacher_weighting, "compare loss-weighting strategies for the teacher at one budget", (
            RUN_DIR,
            arg("--steps", type=int, help="optimizer steps per strategy (default: the run's teacher.max_steps)"),
            arg("--eval-users", type=int, help="test users per strategy (default: the run's teacher.eval_users)"),
            arg("--strategies", default="fixed,uncertainty,gradnorm,dwa"),
            OVERRIDE)),
    "ablate": Command(cmd_ablate, "student ablation over seeds: each KD component off in turn, no-KD, cold start",
                      (RUN_DIR, OVERRIDE)),
    "teacher-curves": Command(
        cmd_teacher_curves, "validation NDCG@10 vs training minutes of teacher runs (table + plot)", (
            arg("run_dirs", nargs="+"),
            arg("--out", default="teacher_curves", help="output path without suffix (.md and .png are written)"))),
    "ship-teacher": Command(cmd_ship_teacher, "copy a run's trained teacher into the package (the shipped teacher)", (
        RUN_DIR, arg("--to", help="destination folder (default: distill/teachers/ml100k-smollm2)"))),
    "loadtest": Command(cmd_loadtest, "bounded load test of the HTTP service on 127.0.0.1", (
        RUN_DIR, arg("--clients", type=int, default=8), arg("--seconds", type=float, default=10.0))),
    "serve": Command(cmd_serve, "HTTP service over the exported ONNX model of a run", (
        RUN_DIR,
        arg("--host", default="127.0.0.1"),
        arg("--port", type=int, default=8000),
        arg("--workers", type=int, default=1),
        arg("--providers", nargs="+", help="e.g. tensorrt cuda cpu (what actually serves is logged)"),
        arg("--unknown-items", choices=["error", "drop"], default="error"),
        arg("--empty-history", choices=["error", "popularity"], default="error"),
        arg("--model-file", help="a variant, e.g. encoder.int8.onnx (student*.onnx: the single graph)"),
        arg("--retrieval", choices=["auto", "exact", "ann"], default="auto",
            help="top-k over the item table: exact, ANN (faiss) or auto (ANN from 50,000 items)"),
        arg("--no-batching", action="store_true", help="one session call per /recommend request"),
        arg("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, help="requests waiting beyond this get 503 + Retry-After"),
        arg("--batch-max", type=int, default=DEFAULT_BATCH_MAX, help="most /recommend requests per session call"),
        arg("--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_MS, help="extra wait for more requests under concurrency"),
        arg("--reload-check-s", type=float, default=DEFAULT_RELOAD_CHECK_S,
            help="seconds between looks at the item table version (<= 0: never reload)"),
        arg("--access-log", action="store_true", help="uvicorn's per-request access log (off: it costs CPU)"))),
    "results": Command(cmd_results, "snapshot a finished run's headline numbers (and fill the README's results block)", (
        RUN_DIR,
        arg("--out", help="snapshot JSON path (default: docs/results/<run name>.json)"),
        arg("--readme", help="a README with <!-- results:begin --> / <!-- results:end --> markers to rewrite"))),
    "synth": Command(cmd_synth, "write a seeded synthetic interaction log (power-law popularity, sequences, ratings, "
                     "item titles) as Parquet", (
        arg("--users", type=int, required=True),
        arg("--items", type=int, required=True),
        arg("--interactions", type=int, required=True, help="total rows; history lengths sum to exactly this"),
        arg("--topics", type=int, help="item groups (default 50)"),
        arg("--seed", type=int, default=0),
        arg("--overwrite", action="store_true", help="replace existing output files"),
        arg("out", help="OUT.parquet (the items go to OUT.items.parquet)"))),
    "scale-bench": Command(cmd_scale_bench, "two-part serving on synthetic catalogs of 10^4-10^6 items: exact vs ANN", (
        RUN_DIR,
        arg("--sizes", default="1e4,1e5,1e6", help="catalog sizes, comma-separated (the real items come first)"),
        arg("--modes", default="exact,ann", help="retrieval modes to time"),
        arg("--requests", type=int, default=256, help="real test histories timed per point"),
        arg("--history", type=int, default=50, help="history length of the requests"),
        arg("--seed", type=int, default=0))),
    "growth": Command(cmd_growth, "how data, cache, student epoch and export cost grow with the log (10^5-10^7 "
                      "synthetic interactions): time, peak memory, log-log slopes, plot", (
        arg("--sizes", default="1e5,1e6,1e7", help="interaction counts, comma-separated"),
        arg("--items", type=int, default=20_000, help="catalog size, fixed over the sizes"),
        arg("--per-user", type=int, default=50, help="interactions per user (users = N / this)"),
        arg("--cache-share", type=float, default=0.02, help="share of users whose positions the cache labels"),
        arg("--threads", type=int, default=2),
        arg("--seed", type=int, default=0),
        arg("--out", default="runs/growth"))),
    "add-items": Command(cmd_add_items, "append new items to a run's served item table (no retraining, no re-export)", (
        RUN_DIR,
        arg("items_file", help="CSV/TSV/Parquet with the run's data.item_id_col and data.item_text_cols columns"),
        arg("--device", default="cpu", help="where the teacher computes the new items' text vectors"))),
    "remove-items": Command(cmd_remove_items, "take items out of serving (a new item table version; rows are kept)", (
        RUN_DIR,
        arg("ids", nargs="*", help="raw item ids"),
        arg("--file", help="a file with one id per line (or a CSV whose first column holds them)"),
        arg("--reactivate", action="store_true", help="bring removed items back into serving"))),
    "explain": Command(cmd_explain, "recommendation reasons: the teacher LLM's vs the served student's supporting "
                       "history items (one user with --user, else the agreement study over seeded test users)", (
        RUN_DIR,
        arg("--user", help="raw user id: explain this user's top-k (history = all of the user's interactions)"),
        arg("--k", type=int, default=5, help="with --user: how many recommendations to explain"),
        arg("--space", default="item", choices=["item", "text"], help="with --user: the student's explain space"),
        arg("--users", type=int, default=100, help="study: seeded test users (their top-3 each)"),
        arg("--seed", type=int, default=0),
        arg("--history-items", type=int, default=20, help="most recent history items shown to both"),
        arg("--max-new-tokens", type=int, default=24, help="tokens generated per reason at most (after the title)"),
        arg("--naming", default="greedy", choices=["free", "greedy", "calibrated"],
            help="how the reason's history title is chosen (distill/reasons.py ReasonConfig.naming)"))),
    "query": Command(cmd_query, "interactive recommendation: build the query encoder (onnx/query/), choose how a "
                     "query joins the user state on validation, evaluate genre queries on test", (
        RUN_DIR,
        arg("--labels", help="CSV/TSV with columns item_id, labels (space-separated) to build queries from; "
                             "default: ML-100K's genres"),
        arg("--seed", type=int, default=0, help="bootstrap seed"))),
    "triton": Command(cmd_triton, "write the Triton model repository runs/<name>/triton", (
        RUN_DIR,
        arg("--gpu", action="store_true", default=None, help="KIND_GPU + TensorRT accelerator block"),
        arg("--max-batch-size", type=int),
        arg("--instances", type=int),
        arg("--model-file"))),
}
"""Every subcommand: name -> Command(handler, help, arguments)."""


def build_parser(commands: dict[str, Command] = COMMANDS) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distillrec", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, command in commands.items():
        sp = sub.add_parser(name, help=command.help, description=command.help)
        for flags, kwargs in command.args:
            sp.add_argument(*flags, **kwargs)
        sp.set_defaults(handler=command.handler)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
