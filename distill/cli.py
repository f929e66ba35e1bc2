"""`distillrec` command line: one subcommand per pipeline stage, plus `run` for all of them.

    distillrec run --config configs/cpu.yaml        # data -> teacher -> cache -> students -> export -> bench
    distillrec <stage> runs/<name>                  # one stage on an existing run folder (reads its config.yaml)

Stages: data, teacher, cache, student, export, bench. `-o key=value` overrides a config field
(e.g. -o teacher.max_steps=20).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

STAGES = ["data", "teacher", "cache", "student", "export", "bench"]


def _write_run_config(cfg) -> Path:
    import yaml

    from . import __version__
    from .config import config_to_dict
    from .data import load_dataset
    from .io import atomic_write_text
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(cfg.data)
    body = config_to_dict(cfg)
    body["_meta"] = dict(package_version=__version__, seed=cfg.seed, data_hash=ds.data_hash)
    atomic_write_text(run / "config.yaml", yaml.safe_dump(body, sort_keys=False))
    return run


def _config_for_run(run_dir: str, overrides):
    from .config import apply_overrides, config_from_dict
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise SystemExit(f"error: {path} not found; start the run with `distillrec run --config <yaml>` "
                         f"(or `distillrec data --config <yaml>`) first")
    import yaml
    values = yaml.safe_load(path.read_text())
    values.pop("_meta", None)
    # no temporary file: every DDP rank parses the same config at once
    cfg = config_from_dict(apply_overrides(values, overrides))
    # the run folder is where the config lives, whatever name/out_dir say
    cfg.out_dir, cfg.name = str(Path(run_dir).parent), Path(run_dir).name
    return cfg


def stage_data(cfg) -> dict:
    from .data import load_dataset
    from .io import write_json
    ds = load_dataset(cfg.data)
    stats = ds.stats()
    write_json(Path(cfg.run_dir) / "data_stats.json", stats)
    print(json.dumps(stats, indent=2))
    return stats


def stage_teacher(cfg) -> dict:
    """Train the teacher, or with teacher.init_from load a trained one (checked against its manifest) and
    evaluate it in this run."""
    if cfg.teacher.init_from:
        from .shipped import adopt_teacher
        rep = adopt_teacher(cfg)
        print(f"teacher: loaded {rep['source']['folder']} (trained by `{rep['source']['command']}`, "
              f"{rep['source']['wall_seconds'] / 60:.0f} min); evaluated here on {rep['eval_users']} test users")
    else:
        from .shipped import write_manifest
        from .teacher_stage import train_teacher
        t0 = time.perf_counter()
        rep = train_teacher(cfg)
        if "metrics" in rep:
            from .data import load_dataset
            write_manifest(Path(cfg.run_dir) / "teacher", cfg, load_dataset(cfg.data).data_hash,
                           time.perf_counter() - t0, rep["metrics"])
    if "metrics" in rep:  # under torchrun only rank 0 evaluates and reports
        from .teacher_report import write_teacher_report
        _print_metrics("teacher", rep["metrics"])
        print(f"teacher report: {write_teacher_report(cfg)}")
    return rep


def stage_cache(cfg) -> dict:
    from .cache import build_cache
    man = build_cache(cfg)
    from .teacher_report import write_teacher_report
    lab = man["labelling"]
    print(f"teacher cache: {man['rows']} positions of {man['users']} users, "
          f"{lab['interactions_per_s']:.1f} interactions/s; teacher report: {write_teacher_report(cfg)}")
    return man


def stage_student(cfg) -> dict:
    from .student_stage import train_student
    out = {}
    for kd in (False, True):  # no-KD first: the KD student's guard (student.kd_guard) compares against it
        rep = train_student(cfg, kd=kd)
        _print_metrics("student" if kd else "student (no KD)", rep["metrics"])
        out["student" if kd else "student_nokd"] = rep
    return out


def stage_export(cfg) -> dict:
    from export.onnx_export import export_run
    from export.triton import write_run_repository
    summary = export_run(Path(cfg.run_dir), cfg.export, seed=cfg.seed)
    summary["triton"] = str(write_run_repository(Path(cfg.run_dir), cfg))
    print(json.dumps(summary, indent=2, default=str))
    return summary


def stage_bench(cfg) -> dict:
    from serve_bench.bench import run_bench
    report = run_bench(cfg)
    print((Path(cfg.run_dir) / "bench" / "report.md").read_text())
    return report


def _print_metrics(name: str, metrics: dict) -> None:
    flat = []
    for task, block in metrics.items():
        if isinstance(block, dict):
            for k, v in block.items():
                if isinstance(v, dict) and "value" in v and k in ("NDCG@10", "HR@10", "RMSE", "AUC"):
                    flat.append(f"{task}/{k}={v['value']:.4f}")
    print(f"[{name}] " + "  ".join(flat))


RUNNERS = dict(data=stage_data, teacher=stage_teacher, cache=stage_cache, student=stage_student,
               export=stage_export, bench=stage_bench)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="distillrec", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run every stage from a config file")
    r.add_argument("--config", required=True)
    r.add_argument("--from-stage", choices=STAGES, default="data", help="skip the stages before this one")
    r.add_argument("--to-stage", choices=STAGES, default="bench", help="stop after this stage")
    r.add_argument("-o", "--override", action="append", default=[])
    for s in STAGES:
        sp = sub.add_parser(s, help=f"run the {s} stage on an existing run folder")
        sp.add_argument("run_dir", nargs="?")
        sp.add_argument("--config", help="(data stage) start a run folder from a config file")
        sp.add_argument("-o", "--override", action="append", default=[])
    tw = sub.add_parser("teacher-weighting", help="compare loss-weighting strategies for the teacher at one budget")
    tw.add_argument("run_dir")
    tw.add_argument("--steps", type=int, help="optimizer steps per strategy (default: the run's teacher.max_steps)")
    tw.add_argument("--eval-users", type=int, help="test users per strategy (default: the run's teacher.eval_users)")
    tw.add_argument("--strategies", default="fixed,uncertainty,gradnorm,dwa")
    tw.add_argument("-o", "--override", action="append", default=[])
    ab = sub.add_parser("ablate", help="student ablation over seeds: each KD component off in turn, no-KD, cold start")
    ab.add_argument("run_dir")
    ab.add_argument("-o", "--override", action="append", default=[])
    lc = sub.add_parser("teacher-curves", help="validation NDCG@10 vs training minutes of teacher runs (table + plot)")
    lc.add_argument("run_dirs", nargs="+")
    lc.add_argument("--out", default="teacher_curves", help="output path without suffix (.md and .png are written)")
    st = sub.add_parser("ship-teacher", help="copy a run's trained teacher into the package (the shipped teacher)")
    st.add_argument("run_dir")
    st.add_argument("--to", help="destination folder (default: distill/teachers/ml100k-smollm2)")
    lt = sub.add_parser("loadtest", help="bounded load test of the HTTP service on 127.0.0.1")
    lt.add_argument("run_dir")
    lt.add_argument("--clients", type=int, default=8)
    lt.add_argument("--seconds", type=float, default=10.0)
    sv = sub.add_parser("serve", help="HTTP service over the exported ONNX model of a run")
    sv.add_argument("run_dir")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--workers", type=int, default=1)
    sv.add_argument("--providers", nargs="+", help="e.g. tensorrt cuda cpu (what actually serves is logged)")
    sv.add_argument("--unknown-items", choices=["error", "drop"], default="error")
    sv.add_argument("--empty-history", choices=["error", "popularity"], default="error")
    sv.add_argument("--model-file", help="a variant, e.g. student.int8.onnx")
    tr = sub.add_parser("triton", help="write the Triton model repository runs/<name>/triton")
    tr.add_argument("run_dir")
    tr.add_argument("--gpu", action="store_true", default=None, help="KIND_GPU + TensorRT accelerator block")
    tr.add_argument("--max-batch-size", type=int)
    tr.add_argument("--instances", type=int)
    tr.add_argument("--model-file")
    args = p.parse_args(argv)

    from .common import apply_threads, set_seed
    if args.cmd == "serve":
        from export.service import serve
        serve(Path(args.run_dir) / "onnx", host=args.host, port=args.port, workers=args.workers,
              providers=args.providers, unknown_items=args.unknown_items, empty_history=args.empty_history,
              model_file=args.model_file)
        return 0
    if args.cmd == "ablate":
        from .ablation import run_ablation
        cfg = _config_for_run(args.run_dir, args.override)
        apply_threads(cfg.threads)
        run_ablation(cfg)
        print((Path(cfg.run_dir) / "student" / "report.md").read_text())
        from serve_bench.report import refresh_ablation
        from .config import config_to_dict
        if refresh_ablation(Path(cfg.run_dir), config_to_dict(cfg)["student"]):
            print(f"folded into {Path(cfg.run_dir) / 'bench' / 'report.md'}")
        return 0
    if args.cmd == "teacher-curves":
        from .teacher_report import learning_curves
        print(learning_curves([Path(r) for r in args.run_dirs], Path(args.out)))
        return 0
    if args.cmd == "ship-teacher":
        from .shipped import SHIPPED_DIR, ship_teacher
        print(f"shipped teacher: {ship_teacher(Path(args.run_dir), Path(args.to) if args.to else SHIPPED_DIR)}")
        return 0
    if args.cmd == "loadtest":
        from serve_bench.loadtest import run_loadtest
        print(json.dumps(run_loadtest(Path(args.run_dir), clients=args.clients, seconds=args.seconds), indent=2))
        return 0
    if args.cmd == "triton":
        from export.triton import write_run_repository
        opts = {k: v for k, v in dict(gpu=args.gpu, max_batch_size=args.max_batch_size, instances=args.instances,
                                      model_file=args.model_file).items() if v is not None}
        print(write_run_repository(Path(args.run_dir), _config_for_run(args.run_dir, []), **opts))
        return 0
    if args.cmd == "teacher-weighting":
        from .teacher_report import compare_weightings
        cfg = _config_for_run(args.run_dir, args.override)
        apply_threads(cfg.threads)
        out = compare_weightings(cfg, args.strategies.split(","), args.steps, args.eval_users)
        print((Path(cfg.run_dir) / "teacher" / "report.md").read_text())
        return 0 if out["rows"] else 1
    if args.cmd == "run" or (args.cmd == "data" and args.config):
        from .config import load_config
        cfg = load_config(args.config, args.override)
        if getattr(args, "run_dir", None):  # an explicit run folder wins over the config's out_dir/name
            cfg.out_dir, cfg.name = str(Path(args.run_dir).parent), Path(args.run_dir).name
        _write_run_config(cfg)
        stages = STAGES[STAGES.index(args.from_stage):STAGES.index(args.to_stage) + 1] if args.cmd == "run" else ["data"]
    else:
        if not args.run_dir:
            raise SystemExit(f"error: `distillrec {args.cmd}` needs a run folder (e.g. runs/cpu-default)")
        cfg = _config_for_run(args.run_dir, args.override)
        stages = [args.cmd]
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
