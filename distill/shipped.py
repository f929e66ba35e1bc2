"""Trained-teacher manifests, the teacher shipped with the package, and adopting a trained teacher into a run.

Every trained teacher folder gets `manifest.json`: the base model's file hash, the data hash, the teacher
config, the fields that shape its network and inputs, the command that trained it and its wall time.
`teacher.init_from` ('shipped' or a folder) makes the teacher stage LOAD such a folder instead of training:
the manifest is checked against this run (base model file, data, shape fields; a mismatch is an error that
says what differs and how to retrain), the files are copied into runs/<name>/teacher/, and the teacher is
evaluated in this run on the protocol's test users (never copied numbers).

    distillrec ship-teacher runs/teacher-cpu     # copy a trained teacher into distill/teachers/ml100k-smollm2
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .config import RunConfig, TeacherConfig
from .io import atomic_write_text, read_json, write_json

SHIPPED_DIR = Path(__file__).parent / "teachers" / "ml100k-smollm2"
"""The teacher shipped with the package: ML-100K + SmolLM2-135M-Instruct (configs/teacher-cpu.yaml)."""
MANIFEST_VERSION = 1
SHAPE_FIELDS = ("model", "gguf_file", "random_init", "tiny", "input", "layers", "lora_r", "lora_alpha",
                "target_modules", "lora_last_layers", "max_item_tokens", "head_dim")
"""Teacher fields that change the network or its inputs (what the saved weights fit). Budgets, learning
rates, windows, evaluation/cache sizes do not: a run may change them and still load the teacher."""
FILES = ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "heads.safetensors",
         "inputs.safetensors", "config.json", "metrics.json", "report.md", "train_log.jsonl", "manifest.json",
         "item_text_stats.npz")
"""What a shipped teacher folder holds (inputs.safetensors only for input='item_tokens'; item_text_stats.npz: the
standardisation statistics of the item text vectors, which `distillrec add-items` needs, distill/item_text.py)."""


class TeacherMismatchError(ValueError):
    pass


def base_model_hash(tc: TeacherConfig) -> str:
    """sha256 (16 hex) of the base model's weights file(s): the GGUF file, or a folder's safetensors/bin files;
    for 'tiny-random' the architecture json (the seed makes the weights)."""
    from .teacher import resolve_model
    if tc.model == "tiny-random":
        return hashlib.sha256(json.dumps(tc.tiny, sort_keys=True).encode()).hexdigest()[:16]
    model, gguf = resolve_model(tc)
    folder = Path(model)
    files = [folder / gguf] if gguf else sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not folder.exists() or not files:  # a hub id: its name is all we can pin offline
        return "name:" + model
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def shape_fields(tc: TeacherConfig | dict) -> dict:
    d = asdict(tc) if isinstance(tc, TeacherConfig) else tc
    return {k: d.get(k) for k in SHAPE_FIELDS}


def write_manifest(teacher_dir: Path, cfg: RunConfig, data_hash: str, wall_seconds: float, metrics: dict) -> dict:
    man = dict(version=MANIFEST_VERSION, base_model=dict(model=cfg.teacher.model, gguf_file=cfg.teacher.gguf_file,
                                                          sha256_16=base_model_hash(cfg.teacher)),
               data=dict(source=cfg.data.source, data_hash=data_hash), shape=shape_fields(cfg.teacher),
               teacher=asdict(cfg.teacher), seed=cfg.seed,
               command="distillrec " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("distillrec")
               else " ".join(sys.argv), wall_seconds=round(wall_seconds, 1),
               created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               test_metrics={t: {k: v["value"] for k, v in m.items() if isinstance(v, dict) and "value" in v}
                             for t, m in metrics.items() if isinstance(m, dict)})
    write_json(Path(teacher_dir) / "manifest.json", man)
    return man


def resolve_init_from(init_from: str) -> Path:
    folder = SHIPPED_DIR if init_from == "shipped" else Path(init_from)
    if not (folder / "manifest.json").exists():
        hint = ("the package was installed without its shipped teacher; reinstall it" if init_from == "shipped"
                else "point teacher.init_from at a trained teacher folder (runs/<name>/teacher)")
        raise FileNotFoundError(f"teacher.init_from={init_from!r}: {folder / 'manifest.json'} not found; {hint}, "
                                "or set teacher.init_from=null to train a teacher")
    return folder


def check_manifest(folder: Path, cfg: RunConfig, data_hash: str) -> dict:
    """The manifest, after checking it against this run's base model, data and shape fields."""
    man = read_json(Path(folder) / "manifest.json", "the teacher stage")
    diffs = []
    if man.get("version") != MANIFEST_VERSION:
        diffs.append(f"manifest version {man.get('version')} (this package reads {MANIFEST_VERSION})")
    if man["data"]["data_hash"] != data_hash:
        diffs.append(f"data: the teacher was trained on {man['data']['source']} with hash {man['data']['data_hash']}, "
                     f"this run's data hashes to {data_hash}")
    want = shape_fields(cfg.teacher)
    for k, v in man["shape"].items():
        if want.get(k) != v:
            diffs.append(f"teacher.{k}: teacher has {v!r}, this config has {want.get(k)!r}")
    if not diffs:  # hash the base model only when the names agree (98 MB read)
        have = base_model_hash(cfg.teacher)
        if man["base_model"]["sha256_16"] != have:
            diffs.append(f"base model file: teacher was trained on {man['base_model']['sha256_16']}, "
                         f"{cfg.teacher.model} hashes to {have}")
    if diffs:
        raise TeacherMismatchError(
            f"the trained teacher in {folder} does not fit this run:\n  - " + "\n  - ".join(diffs) +
            "\nTo train a teacher for this run instead: `-o teacher.init_from=null` (e.g. `distillrec teacher "
            f"{cfg.run_dir} -o teacher.init_from=null`, or configs/teacher-cpu.yaml's settings for the long preset).")
    return man


def adopt_teacher(cfg: RunConfig) -> dict:
    """Copy the checked teacher into runs/<name>/teacher/ and evaluate it here (test split, eval_users)."""
    from .common import pick_device, set_seed
    from .data import Split, load_dataset, sample_users
    from .evaluation import evaluate_predictions
    from .teacher import load_teacher, param_count, saved_teacher_config, teacher_builder
    from .teacher_eval import save_test_predictions, teacher_predict
    ds = load_dataset(cfg.data)
    split = Split.leave_last_out(ds)
    src = resolve_init_from(cfg.teacher.init_from)
    man = check_manifest(src, cfg, ds.data_hash)
    out_dir = Path(cfg.run_dir) / "teacher"
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        if (src / f).exists():
            (out_dir / f).parent.mkdir(parents=True, exist_ok=True)
            dest = out_dir / ("trained_metrics.json" if f == "metrics.json" else f)
            shutil.copyfile(src / f, dest)
    device = pick_device(cfg.device)
    set_seed(cfg.seed)
    teacher, tok, meta = load_teacher(out_dir, merge=True, device=device)
    builder = teacher_builder(teacher, saved_teacher_config(meta), tok, ds.item_text, ds.has_ratings)
    eval_users = sample_users(split.eval_users, cfg.teacher.eval_users, cfg.seed)
    trained = json.loads((src / "metrics.json").read_text())
    _state_eval_cost(builder, split, eval_users, cfg.teacher.eval_history, trained.get("cost", {}))
    pred = teacher_predict(teacher, builder, split, eval_users, "test", cfg.teacher.eval_history,
                           cfg.teacher.infer_batch_tokens, device)
    metrics = evaluate_predictions(pred, split, "test", seed=cfg.seed)
    save_test_predictions(out_dir, pred)
    budget = dict(trained["budget"], eval_users=len(eval_users), eval_history=cfg.teacher.eval_history)
    cost = dict(trained["cost"], eval_tokens=pred["tokens"], eval_seconds=pred["seconds"],
                eval_users_per_s=len(eval_users) / max(pred["seconds"], 1e-9))
    report = dict(metrics=metrics, stage="test", eval_users=len(eval_users), seed=cfg.seed, device=str(device),
                  weighting=trained.get("weighting"), budget=budget, cost=cost,
                  params=dict(trained["params"], total=param_count(teacher)),
                  source=dict(init_from=cfg.teacher.init_from, folder=str(src), command=man["command"],
                              wall_seconds=man["wall_seconds"], base_model=man["base_model"]))
    write_json(out_dir / "metrics.json", report)
    return report


def _state_eval_cost(builder, split, users, history: int, trained_cost: dict) -> None:
    """Say before evaluating what it will cost: the exact token count at the training run's measured evaluation
    throughput (the adopted teacher's stage has no training to cut, so there is nothing to budget)."""
    from .budget import cost_statement
    from .teacher_eval import eval_tokens
    if not (trained_cost.get("eval_tokens") and trained_cost.get("eval_seconds")):
        return
    tps = trained_cost["eval_tokens"] / trained_cost["eval_seconds"]
    print(f"teacher: evaluating the adopted teacher on {len(users)} test users: " + cost_statement(
        "evaluation", eval_tokens(builder, split, users, "test", history), tps,
        "its training run's evaluation throughput, another machine perhaps"), flush=True)


def ship_teacher(run_dir: Path, dest: Path = SHIPPED_DIR) -> Path:
    """Copy a trained teacher (runs/<name>/teacher) into `dest` (the package's shipped teacher by default)."""
    src = Path(run_dir) / "teacher"
    if not (src / "manifest.json").exists():
        raise FileNotFoundError(f"{src / 'manifest.json'} not found: train the teacher first "
                                f"(`distillrec run --config configs/teacher-cpu.yaml --to-stage teacher`)")
    tmp = Path(str(dest) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for f in FILES:
        if (src / f).exists():
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / f, tmp / f)
    size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    if size > 30 * 2 ** 20:
        shutil.rmtree(tmp)
        raise ValueError(f"the teacher folder is {size / 2 ** 20:.1f} MB; a shipped teacher must stay <= 30 MB")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    atomic_write_text(dest / "SHIPPED", f"copied from {src} ({size / 2 ** 20:.1f} MB)\n")
    return dest
