"""Distillation ablation: what each KD component, the teacher and the text vectors add (issue 4).

`run_ablation(cfg)` trains, on the run's cached teacher (teacher_cache/), for every seed of
`student.ablation_seeds`, with the ablation budget (student.ablation_epochs / ablation_time_budget_s
per model, under the student stage's budget rule: an epoch is max(one pass, student.min_steps_per_epoch)
optimizer steps; early stopping as usual):

  kd_full        the student with every KD component of the config on
  no_<c>         the same with one component switched off (next_item KL, listwise, rating KD, like KD,
                 alignment)
  rank_kd        kd_full with the importance-weighted top-k ranking distillation (DLLM2Rec) switched on
                 (student.kd_rank, RANK_KD_WEIGHT when the config has it off; skipped when already on)
  kd_guarded     not trained: per seed, kd_full if its best validation NDCG@10 >= no_kd's, else no_kd (what the
                 student stage serves with student.kd_guard; needs both rows)
  no_kd          no teacher labels (alpha = 0, no alignment); same architecture, text vectors kept
  no_teacher     no teacher at all: no KD and no text vectors (ID embeddings only)
  cold_text      kd_full trained with a seeded slice of items held out entirely (their events dropped
                 from the training sequences, masked out of every softmax)
  cold_id_only   the same without text vectors: a held-out item has only its untrained ID embedding
  cold_id_drop   cold_text trained with ID dropout (student.id_dropout, COLD_ID_DROPOUT when the config has
                 none): the model also learns to score items from their text alone (DropoutNet)

Every protocol metric with its 95% bootstrap CI (distill.evaluation.evaluate_predictions) on all test
users, as mean +- std over seeds, with the CI of the first seed; the same on the teacher's evaluation
users next to the teacher; cold-start quality on the test events whose target is a held-out item; the
baselines; parameter counts vs the teacher; training time; the targets, and every student row below the
popularity baseline. Writes <run>/ablation/report.json + report.md and nothing else: the bench reads the json.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from . import metrics as M
from .baselines import BASELINES, evaluate_baselines
from .cache import load_cache
from .common import machine_info, pick_device
from .config import RunConfig
from .data import Split, load_dataset
from .evaluation import evaluate_predictions, subset
from .io import atomic_write_text, read_json, write_json
from .student_stage import cold_item_slice, fit_student, student_predict

# key -> (label, StudentConfig overrides, use_teacher, cold-start hold-out)
VARIANTS: dict[str, tuple[str, dict, bool, bool]] = {
    "kd_full": ("student (KD, all components)", {}, True, False),
    "no_kl": ("- next_item KL", {"kd_next_item": 0.0}, True, False),
    "no_listwise": ("- listwise (ListMLE)", {"kd_listwise": 0.0}, True, False),
    "no_rating_kd": ("- rating KD", {"kd_rating": 0.0}, True, False),
    "no_like_kd": ("- like KD", {"kd_like": 0.0}, True, False),
    "no_align": ("- representation alignment", {"kd_align": 0.0}, True, False),
    "rank_kd": ("+ ranking distillation (DLLM2Rec)", {"kd_rank": "on"}, True, False),
    "kd_guarded": ("student (KD) behind the validation guard (student.kd_guard)", {}, True, False),
    "no_kd": ("student without KD (hard labels, text vectors)", {"kd_alpha": 0.0, "kd_align": 0.0}, False, False),
    "no_teacher": ("student without the teacher (no KD, no text vectors)",
                   {"kd_alpha": 0.0, "kd_align": 0.0, "use_text_vectors": False}, False, False),
    "cold_text": ("cold start: KD student, text vectors", {}, True, True),
    "cold_id_only": ("cold start: KD student, ID embeddings only", {"use_text_vectors": False}, True, True),
    "cold_id_drop": ("cold start: KD student, text vectors + ID dropout", {"id_dropout": "cold"}, True, True),
}
COLD_ID_DROPOUT = 0.3
"""ID dropout of the cold_id_drop row when the config's student.id_dropout is 0 (DropoutNet trains with
a sizeable share of items reduced to their content; 0.3 leaves most steps collaborative)."""
RANK_KD_WEIGHT = 1.0
"""kd_rank of the rank_kd row when the config's student.kd_rank is 0: the loss is a cross-entropy against a
distribution over items, in the same units as the KL (kd_next_item = 1.0)."""
TARGET_METRICS = (("next_item", "NDCG@10", +1), ("like", "AUC", +1), ("rating", "RMSE", -1))
"""The issue's 'student >= teacher' metrics with their direction (+1 higher is better)."""


# ----------------------------------------------------------------------------- aggregation
def _flat(metrics: dict):
    for task in M.TASKS:
        for name, entry in (metrics.get(task) or {}).items():
            if isinstance(entry, dict) and "value" in entry:
                yield task, name, entry


def aggregate_seeds(per_seed: list[dict]) -> dict:
    """{task: {metric: {value: mean, std, seeds: [...], ci: first seed's CI, ci_value: first seed's value}}}."""
    out: dict = {}
    for task, name, first in _flat(per_seed[0]):
        vals = [float(m[task][name]["value"]) for m in per_seed]
        std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        out.setdefault(task, {})[name] = dict(value=float(np.mean(vals)), std=std, seeds=vals,
                                              ci=list(first["ci"]), ci_value=float(first["value"]))
    out["n_users"] = per_seed[0].get("n_users")
    return out


# ----------------------------------------------------------------------------- paired comparison
def _target_stats(pred: dict, split: Split):
    """Weight-form statistics (metrics.bootstrap_ci convention) of the target metrics for `pred`'s users."""
    users = pred["users"]
    targets, true_r = split.targets(users, "test")
    per_user = M.ranking_metrics(pred["scores"], targets, [split.seen(u, "test") for u in users], ks=(10,))
    fns = {("next_item", "NDCG@10"): M.mean_stat(per_user["NDCG@10"])}
    if true_r is not None and "rating" in pred:
        sq = M.mean_stat((np.asarray(pred["rating"], np.float64) - true_r) ** 2)
        fns[("rating", "RMSE")] = lambda w: np.sqrt(sq(w))
        z, y = np.asarray(pred["like_logit"], np.float64), true_r >= split.ds.like_threshold
        fns[("like", "AUC")] = lambda w: M._auc_weighted(z, y, w)
    return fns


def paired_difference(pred_a: dict, pred_b: dict, split: Split, n_boot: int = 1000, seed: int = 0) -> dict:
    """a - b on the same users with ONE shared resampling of users: {task: {metric: {value, ci}}}."""
    if not np.array_equal(pred_a["users"], pred_b["users"]):
        raise ValueError("paired comparison needs the same users in the same order")
    fa, fb = _target_stats(pred_a, split), _target_stats(pred_b, split)
    n = len(pred_a["users"])
    out: dict = {}
    for key in fa.keys() & fb.keys():
        fn = (lambda f1, f2: (lambda w: f1(w) - f2(w)))(fa[key], fb[key])
        value = float(fn(np.ones((1, n)))[0])
        out.setdefault(key[0], {})[key[1]] = dict(value=value, ci=list(M.bootstrap_ci(fn, n, n_boot=n_boot, seed=seed)))
    return out


# ----------------------------------------------------------------------------- main
REPORT_DIR = "ablation"
"""run_ablation writes <run>/ablation/report.json + report.md (the bench reads the json; it never writes there)."""
POPULARITY_FACTOR = 1.2
"""The no-KD student's NDCG@10 target against the popularity baseline (issue 12): a student that does not clearly
beat ranking by popularity has not learned the data (too small a budget, or a bug)."""


def report_paths(run) -> tuple[Path, Path]:
    """(report.json, report.md) of the ablation of `run`."""
    out = Path(run) / REPORT_DIR
    return out / "report.json", out / "report.md"


def _resolve_overrides(sc, overrides: dict) -> dict:
    """A variant's StudentConfig overrides with placeholders filled ("cold": the config's ID dropout or
    COLD_ID_DROPOUT; "on": the config's kd_rank or RANK_KD_WEIGHT)."""
    if overrides.get("id_dropout") == "cold":
        overrides = dict(overrides, id_dropout=sc.id_dropout or COLD_ID_DROPOUT)
    if overrides.get("kd_rank") == "on":
        overrides = dict(overrides, kd_rank=sc.kd_rank or RANK_KD_WEIGHT)
    return overrides


def _skip_reason(sc, key: str, overrides: dict):
    """Why a one-component row would be identical to kd_full (its resolved overrides are already the
    config's), else None."""
    toggles = key == "rank_kd" or (key.startswith("no_") and key not in ("no_kd", "no_teacher"))
    if toggles and all(getattr(sc, k) == v for k, v in overrides.items()):
        return f"the component is already {'on' if key == 'rank_kd' else 'off'} in the config (identical to kd_full)"
    return None


def _variant_config(cfg: RunConfig, overrides: dict):
    """The ablation budget: ablation_epochs epochs (of max(one pass, min_steps_per_epoch) steps each, the stage's
    budget rule: distill.student_stage.training_budget) under ablation_time_budget_s."""
    sc = cfg.student
    return replace(sc, epochs=sc.ablation_epochs, time_budget_s=sc.ablation_time_budget_s, **overrides)


def _selected_variants(cfg: RunConfig) -> list[str]:
    keys = list(cfg.student.ablation_variants or VARIANTS)
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown student.ablation_variants {unknown}; choose from {list(VARIANTS)}")
    if "kd_full" not in keys:
        keys.insert(0, "kd_full")  # every comparison is against it
    return keys


@dataclass
class AblationSetup:
    """Everything the ablation reads before training: the data, the teacher's cache and test predictions,
    the evaluation users and the cold-start item slice."""
    run: Path
    seeds: list
    device: str
    ds: object
    split: Split
    cache: dict
    t_meta: dict
    t_pred: dict
    users: np.ndarray
    cold_items: np.ndarray
    cold_users: np.ndarray
    keys: list
    n_boot: int


def setup_ablation(cfg: RunConfig) -> AblationSetup:
    """Load the data, the teacher cache and the teacher's test predictions; choose the rows to train."""
    run, sc = Path(cfg.run_dir), cfg.student
    seeds = [int(s) for s in sc.ablation_seeds]
    if not seeds:
        raise ValueError("student.ablation_seeds is empty; give at least one seed (3 for a seed spread)")
    ds = load_dataset(cfg.data)
    split = Split.leave_last_out(ds)
    cache = load_cache(run, ds.data_hash)
    t_meta = read_json(run / "teacher" / "metrics.json", f"the teacher stage (`distillrec teacher {run}`)")
    t_pred_path = run / "teacher" / "test_predictions.npz"
    if not t_pred_path.exists():
        raise FileNotFoundError(f"{t_pred_path} is missing; run `distillrec teacher {run}`")
    with np.load(t_pred_path) as z:
        t_pred = {k: z[k] for k in z.files}
    users = split.eval_users
    cold_items = cold_item_slice(ds.n_items, sc.cold_item_fraction, sc.cold_item_seed)
    test_targets, _ = split.targets(users, "test")
    keys = _selected_variants(cfg)
    if not len(cold_items):
        keys = [k for k in keys if not VARIANTS[k][3]]
    return AblationSetup(run=run, seeds=seeds, device=pick_device(cfg.device), ds=ds, split=split, cache=cache,
                         t_meta=t_meta, t_pred=t_pred, users=users, cold_items=cold_items,
                         cold_users=users[np.isin(test_targets, cold_items)], keys=keys,
                         n_boot=int(sc.ablation_n_boot))


def train_variant(cfg: RunConfig, s: AblationSetup, key: str, log=print) -> tuple[dict, dict]:
    """Train one row once per seed and evaluate it; (entry, the first seed's test predictions or {})."""
    label, overrides, use_teacher, cold = VARIANTS[key]
    overrides = _resolve_overrides(cfg.student, overrides)
    entry = dict(label=label, overrides=overrides, use_teacher=use_teacher, cold_start=cold, runs=[],
                 all_users=[], teacher_subset=[], cold_subset=[])
    skip = _skip_reason(cfg.student, key, overrides)
    if skip:
        log(f"[ablation] {key}: skipped ({skip})")
        return dict(entry, skipped=skip), {}
    vsc, pred0 = _variant_config(cfg, overrides), {}
    for seed in s.seeds:
        fit = fit_student(vsc, s.split, s.cache, use_teacher=use_teacher, seed=seed, device=s.device,
                          exclude_items=s.cold_items if cold else None, desc=f"ablation {key} seed {seed}")
        pred = student_predict(fit.student, s.split, s.users, "test", device=s.device)
        entry["all_users"].append(evaluate_predictions(pred, s.split, "test", n_boot=s.n_boot, seed=seed))
        entry["teacher_subset"].append(evaluate_predictions(subset(pred, s.t_pred["users"]), s.split, "test",
                                                            n_boot=s.n_boot, seed=seed))
        if len(s.cold_users) and (cold or key == "kd_full"):
            entry["cold_subset"].append(_safe_eval(subset(pred, s.cold_users), s.split, s.n_boot, seed))
        entry["runs"].append(_run_record(seed, fit))
        entry["components"], entry["params"] = fit.components, fit.student.param_counts()
        if seed == s.seeds[0]:
            pred0 = pred
        log(f"[ablation] {key} seed {seed}: NDCG@10 {entry['all_users'][-1]['next_item']['NDCG@10']['value']:.4f} "
            f"({fit.train_seconds:.0f} s, {len(fit.history)} epochs = {fit.steps} steps, {fit.stop_reason})")
    return entry, pred0


def _run_record(seed: int, fit) -> dict:
    b = fit.budget
    return dict(seed=seed, train_seconds=fit.train_seconds, epochs_run=len(fit.history), steps=fit.steps,
                steps_per_epoch=b.steps_per_epoch, passes_per_epoch=b.passes_per_epoch, patience=b.patience,
                best_epoch=fit.best_epoch,
                best_val_ndcg10=fit.best_val_ndcg10, stop_reason=fit.stop_reason,
                teacher_coverage=fit.teacher_coverage, seconds_per_epoch=fit.train_seconds / max(1, len(fit.history)))


def train_variants(cfg: RunConfig, s: AblationSetup, log=print) -> tuple[dict, dict, float]:
    """Every selected row ({key: entry}), the first seed's predictions per row, and the seconds it took;
    kd_guarded is built from kd_full and no_kd (not trained)."""
    variants, preds0, t0 = {}, {}, time.perf_counter()
    for key in s.keys:
        if key == "kd_guarded":  # a selection between two trained rows, built after the loop
            continue
        variants[key], pred0 = train_variant(cfg, s, key, log)
        if pred0:
            preds0[key] = pred0
    if "kd_guarded" in s.keys:
        label, overrides, use_teacher, cold = VARIANTS["kd_guarded"]
        entry = dict(label=label, overrides=overrides, use_teacher=use_teacher, cold_start=cold, runs=[],
                     all_users=[], teacher_subset=[], cold_subset=[])
        if variants["kd_full"]["runs"] and variants.get("no_kd", {}).get("runs"):
            entry = guarded_row(entry, variants["kd_full"], variants["no_kd"])
            preds0["kd_guarded"] = preds0["kd_full" if entry["runs"][0]["kept"] == "kd" else "no_kd"]
        else:
            entry["skipped"] = "needs both kd_full and no_kd"
        variants["kd_guarded"] = entry
    return {k: variants[k] for k in s.keys}, preds0, time.perf_counter() - t0


def result_tables(s: AblationSetup, variants: dict) -> tuple[dict, dict, dict]:
    """(all test users, the teacher's evaluation users, cold-start events): {row label: metrics}, seed-aggregated
    rows first, then the teacher and the baselines."""
    trained = [k for k in variants if variants[k]["runs"]]
    warm = [k for k in trained if not VARIANTS[k][3]]
    seed0, t_users = s.seeds[0], s.t_pred["users"]
    all_rows = {variants[k]["label"]: aggregate_seeds(variants[k]["all_users"]) for k in warm}
    all_rows.update(evaluate_baselines(s.split, "test", s.users, n_boot=s.n_boot, seed=seed0))
    sub_rows = {"teacher": evaluate_predictions(s.t_pred, s.split, "test", n_boot=s.n_boot, seed=seed0)}
    sub_rows.update({variants[k]["label"]: aggregate_seeds(variants[k]["teacher_subset"]) for k in warm})
    sub_rows.update(evaluate_baselines(s.split, "test", t_users, n_boot=s.n_boot, seed=seed0))
    cold_rows = {}
    for k in ("cold_text", "cold_id_drop", "cold_id_only", "kd_full"):
        if k in variants and variants[k]["cold_subset"]:
            label = variants[k]["label"] + (" (reference: trained on every item)" if k == "kd_full" else "")
            cold_rows[label] = aggregate_seeds(variants[k]["cold_subset"])
    if len(s.cold_users):
        cold_rows["popularity"] = evaluate_baselines(s.split, "test", s.cold_users, n_boot=s.n_boot,
                                                     seed=seed0)["popularity"]
    return all_rows, sub_rows, cold_rows


def param_summary(s: AblationSetup, variants: dict) -> dict:
    """The full KD student's parameters against the teacher's, and every row's counts."""
    teacher_params = int(s.t_meta["params"]["total"])
    sp = variants["kd_full"]["params"]
    return dict(teacher_total=teacher_params, teacher_lora_trainable=s.t_meta["params"].get("lora_trainable"),
                student_params=sp["params"], student_buffers=sp["buffers"], student_total=sp["total"],
                ratio_params=sp["params"] / teacher_params, ratio_total=sp["total"] / teacher_params,
                per_variant={v["label"]: v["params"] for v in variants.values() if v["runs"]})


def training_time(sc, s: AblationSetup, variants: dict, total_seconds: float) -> dict:
    """The per-model budget (epochs, the steps they are under the budget rule, time cap), what the full KD
    student took, the bound it implies for the stage config, the stage's own time, and the runs the cap cut."""
    full_runs = variants["kd_full"]["runs"]
    sec_per_epoch = float(np.mean([r["seconds_per_epoch"] for r in full_runs]))
    budget = dict(epochs=sc.ablation_epochs, time_budget_s=sc.ablation_time_budget_s,
                  min_steps_per_epoch=sc.min_steps_per_epoch, max_steps_per_epoch=sc.max_steps_per_epoch,
                  # the effective patience in epochs: max(patience, ceil(min_patience_steps / steps per epoch))
                  patience=full_runs[0]["patience"], min_patience_steps=sc.min_patience_steps,
                  steps_per_epoch=full_runs[0]["steps_per_epoch"],
                  passes_per_epoch=full_runs[0]["passes_per_epoch"],
                  max_steps=sc.ablation_epochs * full_runs[0]["steps_per_epoch"])
    timing = dict(per_model_budget=budget,
                  kd_full_train_seconds=[r["train_seconds"] for r in full_runs],
                  kd_full_seconds_per_epoch=sec_per_epoch,
                  kd_full_epochs_run=[r["epochs_run"] for r in full_runs],
                  estimated_seconds_for_config_epochs=sec_per_epoch * sc.epochs,
                  config_epochs=sc.epochs, config_time_budget_s=sc.time_budget_s,
                  ablation_total_seconds=total_seconds)
    stage_metrics = s.run / "student" / "metrics.json"
    if stage_metrics.exists():
        sm = read_json(stage_metrics, "the student stage")
        timing["student_stage"] = {k: sm.get(k) for k in ("train_seconds", "epochs_run", "best_epoch", "stop_reason",
                                                           "windows", "device", "torch_threads", "steps")}
    timing["runs_cut_by_time_budget"] = [f"{k} seed {r['seed']}" for k, v in variants.items() for r in v["runs"]
                                         if r["stop_reason"] == "time_budget"]
    return timing


def build_report(cfg: RunConfig, s: AblationSetup, variants: dict, preds0: dict, total_seconds: float) -> dict:
    """The report dict (the schema of ablation/report.json)."""
    sc = cfg.student
    all_rows, sub_rows, cold_rows = result_tables(s, variants)
    params = param_summary(s, variants)
    return dict(
        run=str(s.run), command=f"distillrec ablate {s.run}", data_hash=s.ds.data_hash, seeds=s.seeds,
        device=s.device, machine=machine_info(), n_boot=s.n_boot,
        cache=dict(users=int(len(s.cache["users"])), rows=int(s.cache["offsets"][-1]),
                   top_k=int(s.cache["next_topk_items"].shape[1])),
        student_config=asdict(sc),
        variants={k: {kk: vv for kk, vv in v.items() if kk not in ("all_users", "teacher_subset", "cold_subset")}
                  for k, v in variants.items()},
        all_users=dict(users=int(len(s.users)), rows=all_rows),
        teacher_subset=dict(users=int(len(s.t_pred["users"])), teacher_budget=s.t_meta.get("budget"), rows=sub_rows),
        cold_start=dict(fraction=sc.cold_item_fraction, seed=sc.cold_item_seed, items=int(len(s.cold_items)),
                        test_events=int(len(s.cold_users)), rows=cold_rows),
        params=params, training_time=training_time(sc, s, variants, total_seconds),
        below_popularity=_below_popularity(all_rows),
        targets=_targets(variants, preds0, s.t_pred, s.split, params, s.n_boot, s.seeds[0], all_rows))


def write_report(report: dict, run) -> tuple[Path, Path]:
    """ablation/report.json + ablation/report.md (nothing outside the ablation's folder)."""
    json_path, md_path = report_paths(run)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(json_path, report)
    atomic_write_text(md_path, render_markdown(report))
    return json_path, md_path


def run_ablation(cfg: RunConfig, log=print) -> dict:
    """Train and evaluate every ablation row over the configured seeds; write ablation/report.{json,md}:
    setup -> train the rows -> tables, parameters, timing, targets -> write."""
    s = setup_ablation(cfg)
    variants, preds0, total_seconds = train_variants(cfg, s, log)
    report = build_report(cfg, s, variants, preds0, total_seconds)
    write_report(report, s.run)
    return report


def guarded_row(entry: dict, kd: dict, nokd: dict) -> dict:
    """The kd_guard rule per seed: keep the KD student when its best validation NDCG@10 >= the no-KD student's."""
    entry = dict(entry, runs=[], all_users=[], teacher_subset=[], cold_subset=[])
    for i, (rk, rn) in enumerate(zip(kd["runs"], nokd["runs"])):
        if rk["seed"] != rn["seed"]:
            raise ValueError(f"kd_full and no_kd seeds differ ({rk['seed']} vs {rn['seed']})")
        keep_kd = rk["best_val_ndcg10"] >= rn["best_val_ndcg10"]
        src, run = (kd, rk) if keep_kd else (nokd, rn)
        entry["runs"].append(dict(run, kept="kd" if keep_kd else "no_kd", kd_val_ndcg10=rk["best_val_ndcg10"],
                                  no_kd_val_ndcg10=rn["best_val_ndcg10"]))
        entry["all_users"].append(src["all_users"][i])
        entry["teacher_subset"].append(src["teacher_subset"][i])
    entry["components"], entry["params"] = kd["components"], kd["params"]
    return entry


def _safe_eval(pred: dict, split: Split, n_boot: int, seed: int) -> dict:
    """evaluate_predictions on a small subset; like metrics are dropped when the subset has one class."""
    try:
        return evaluate_predictions(pred, split, "test", n_boot=n_boot, seed=seed)
    except ValueError:
        pred = {k: v for k, v in pred.items() if k not in ("rating", "like_logit")}
        return evaluate_predictions(pred, split, "test", n_boot=n_boot, seed=seed)


def _ndcg10(row: dict) -> float:
    return float(row["next_item"]["NDCG@10"]["value"])


def _below_popularity(all_rows: dict) -> list[dict]:
    """Every trained row whose NDCG@10 (seed mean) on all test users is below the popularity baseline's."""
    pop = all_rows.get("popularity")
    if pop is None:
        return []
    return [dict(row=label, ndcg10=_ndcg10(row), popularity_ndcg10=_ndcg10(pop))
            for label, row in all_rows.items() if label not in BASELINES and _ndcg10(row) < _ndcg10(pop)]


def _popularity_target(variants: dict, all_rows: dict) -> list[dict]:
    """The no-KD student >= POPULARITY_FACTOR x popularity on NDCG@10 (seed mean, all test users)."""
    if not variants.get("no_kd", {}).get("all_users") or "popularity" not in all_rows:
        return []
    no, pop = _ndcg10(all_rows[VARIANTS["no_kd"][0]]), _ndcg10(all_rows["popularity"])
    return [dict(target=f"no-KD student NDCG@10 >= {POPULARITY_FACTOR} x popularity (seed mean, all test users)",
                 met=bool(no >= POPULARITY_FACTOR * pop),
                 detail=f"no-KD / popularity = {no / max(pop, 1e-12):.3f} ({no:.4f} / {pop:.4f}); below it the student "
                        f"has not learned the data: a larger budget (student.epochs, student.min_steps_per_epoch)")]


def _targets(variants, preds0, t_pred, split, params, n_boot, seed, all_rows) -> list[dict]:
    out = _popularity_target(variants, all_rows)
    kd_sub = subset(preds0["kd_full"], t_pred["users"])
    diff = paired_difference(kd_sub, t_pred, split, n_boot=n_boot, seed=seed)
    for task, metric, sign in TARGET_METRICS:
        d = (diff.get(task) or {}).get(metric)
        if d is None:
            continue
        # "student >= teacher within CI": the paired CI of (student - teacher) reaches the good side of 0
        met = (d["ci"][1] >= 0) if sign > 0 else (d["ci"][0] <= 0)
        out.append(dict(target=f"student >= teacher on {task}/{metric} (within CI)", met=bool(met),
                        detail=f"student - teacher = {d['value']:+.4f}, paired 95% CI [{d['ci'][0]:+.4f}, "
                               f"{d['ci'][1]:+.4f}] on the teacher's {len(t_pred['users'])} users "
                               f"({'higher' if sign > 0 else 'lower'} is better; seed {seed} student)",
                        difference=d))
    if variants.get("no_kd", {}).get("all_users"):
        kd = aggregate_seeds(variants["kd_full"]["all_users"])["next_item"]["NDCG@10"]
        no = aggregate_seeds(variants["no_kd"]["all_users"])["next_item"]["NDCG@10"]
        gap, spread = kd["value"] - no["value"], kd["std"] + no["std"]
        out.append(dict(target="KD student > no-KD student on next_item/NDCG@10 beyond the seed spread",
                        met=bool(gap > spread and len(kd["seeds"]) > 1),
                        detail=f"mean KD - no-KD = {gap:+.4f} vs seed spread (std KD + std no-KD) = {spread:.4f} "
                               f"over {len(kd['seeds'])} seeds, all test users",
                        kd=kd, no_kd=no))
        out.append(dict(target="KD student NDCG@10 >= 1.05 x the no-KD student (seed means)",
                        met=bool(kd["value"] >= 1.05 * no["value"]),
                        detail=f"KD / no-KD = {kd['value'] / max(no['value'], 1e-12):.3f} "
                               f"({kd['value']:.4f} / {no['value']:.4f})"))
        if variants.get("kd_guarded", {}).get("all_users"):
            g = aggregate_seeds(variants["kd_guarded"]["all_users"])["next_item"]["NDCG@10"]
            kept = [r["kept"] for r in variants["kd_guarded"]["runs"]]
            out.append(dict(target="KD never hurts: guarded KD mean >= no-KD mean - (std KD + std no-KD)",
                            met=bool(g["value"] >= no["value"] - (g["std"] + no["std"])),
                            detail=f"guarded {g['value']:.4f} ± {g['std']:.4f} vs no-KD {no['value']:.4f} ± "
                                   f"{no['std']:.4f}; the guard kept {kept} (seeds in order)"))
    teacher_m = evaluate_predictions(t_pred, split, "test", n_boot=n_boot, seed=seed)
    if variants.get("no_kd", {}).get("all_users") and np.array_equal(np.sort(t_pred["users"]), split.eval_users):
        no_all = aggregate_seeds(variants["no_kd"]["all_users"])
        checks = []
        for task, metric, sign in TARGET_METRICS:
            if task in teacher_m and task in no_all:
                tv, nv = teacher_m[task][metric]["value"], no_all[task][metric]["value"]
                checks.append((f"{task}/{metric}", tv, nv, (tv >= nv) if sign > 0 else (tv <= nv)))
        out.append(dict(target="teacher at least as good as the no-KD student (all test users)",
                        met=bool(checks and all(c[3] for c in checks)),
                        detail="; ".join(f"{n}: teacher {tv:.4f} vs no-KD {nv:.4f} ({'ok' if ok else 'NOT met'})"
                                         for n, tv, nv, ok in checks)))
    out.append(dict(target="student parameters <= 2% of the teacher's", met=bool(params["ratio_params"] <= 0.02),
                    detail=f"{params['student_params']:,} trainable / {params['teacher_total']:,} = "
                           f"{100 * params['ratio_params']:.3f}% (with the frozen text-vector table: "
                           f"{100 * params['ratio_total']:.3f}%)"))
    return out


def render_markdown(rep: dict) -> str:
    """ablation/report.md: header and warnings, targets, the three metric tables, parameters, time, rows."""
    sections = (_md_header, _md_targets, _md_tables, _md_params, _md_time, _md_variants)
    return "\n".join(line for section in sections for line in section(rep))


def _md_header(rep: dict) -> list[str]:
    t = rep["training_time"]
    b = t["per_model_budget"]
    floor = f"; an epoch is at least {b['min_steps_per_epoch']} steps" if b.get("min_steps_per_epoch") else ""
    steps = (f"{b['epochs']} epochs of {b['steps_per_epoch']} optimizer steps ({b['passes_per_epoch']:.2f} passes over "
             f"the training windows{floor}) = at most {b['max_steps']} steps" if "steps_per_epoch" in b
             else f"at most {b['epochs']} epochs")
    lines = [f"# Distillation ablation — {rep['run']}", "",
             f"Produced by `{rep['command']}`. Seeds {rep['seeds']}; device {rep['device']}; "
             f"{rep['machine'].get('cpu_count')} CPUs visible, torch threads {rep['machine'].get('torch_threads')}.",
             f"Budget per ablation model: {steps}, or {b['time_budget_s']:.0f} s "
             f"(early stopping on validation NDCG@10, patience {b['patience']} epochs"
             + (f", {b['max_steps_per_epoch']} steps per epoch at most" if b['max_steps_per_epoch'] else "") + "). "
             f"Whole ablation: {t['ablation_total_seconds'] / 60:.1f} min."]
    if t.get("runs_cut_by_time_budget"):
        lines.append(f"**Warning:** {len(t['runs_cut_by_time_budget'])} run(s) stopped by the time budget, not by "
                     f"epochs or early stopping ({', '.join(t['runs_cut_by_time_budget'])}): they trained fewer steps "
                     f"than the others (a loaded machine?), so their rows are not comparable.")
    for r in rep.get("below_popularity", []):
        lines.append(f"**Warning:** {r['row']} is below the popularity baseline on NDCG@10 ({r['ndcg10']:.4f} < "
                     f"{r['popularity_ndcg10']:.4f}): it has not learned this data.")
    lines += [f"Cells: mean ± std over the seeds [95% bootstrap CI over users of seed {rep['seeds'][0]}, "
              f"{rep['n_boot']} resamples]; single runs (teacher, baselines): value [CI].",
              f"Teacher cache: {rep['cache']['users']} users, {rep['cache']['rows']} labelled positions, "
              f"top-{rep['cache']['top_k']}.", ""]
    return lines


def _md_targets(rep: dict) -> list[str]:
    lines = ["## Targets", "", "| target | met | detail |", "| --- | --- | --- |"]
    lines += [f"| {tg['target']} | {'**yes**' if tg['met'] else '**no**'} | {tg['detail']} |" for tg in rep["targets"]]
    return lines + [""]


def _md_tables(rep: dict) -> list[str]:
    cs = rep["cold_start"]
    return [f"## All test users ({rep['all_users']['users']})", "", M.format_metrics_table(rep["all_users"]["rows"]),
            "", f"## Teacher's evaluation users ({rep['teacher_subset']['users']}; the teacher is evaluated on a "
            f"seeded subset because of its CPU budget)", "", M.format_metrics_table(rep["teacher_subset"]["rows"]), "",
            f"## Cold start ({cs['items']} items = {100 * cs['fraction']:.0f}% held out of student training, "
            f"seed {cs['seed']}; {cs['test_events']} test events target one of them)", "",
            M.format_metrics_table(cs["rows"]) if cs["rows"] else "_no test event targets a held-out item_", "",
            "A held-out item's ID embedding never gets a gradient (its events are dropped and it is masked out "
            "of every softmax), so without text vectors the student can only rank it by chance; with them it "
            "is scored through the projection of its frozen LLM text vector.", ""]


def _md_params(rep: dict) -> list[str]:
    p = rep["params"]
    lines = ["## Parameters", "", "| system | parameters | with frozen buffers | share of the teacher |",
             "| --- | --- | --- | --- |", f"| teacher (LLM + LoRA + heads) | {p['teacher_total']:,} | – | 100% |"]
    for label, c in p["per_variant"].items():
        lines.append(f"| {label} | {c['params']:,} | {c['total']:,} | "
                     f"{100 * c['params'] / p['teacher_total']:.3f}% ({100 * c['total'] / p['teacher_total']:.3f}%) |")
    return lines + [""]


def _md_time(rep: dict) -> list[str]:
    t = rep["training_time"]
    lines = ["## Training time", "",
             f"- Full KD student, ablation budget: {', '.join(f'{s:.0f} s' for s in t['kd_full_train_seconds'])} "
             f"({', '.join(str(e) for e in t['kd_full_epochs_run'])} epochs; {t['kd_full_seconds_per_epoch']:.1f} s "
             f"per epoch over all {rep['all_users']['users']} users' training windows).",
             f"- At the stage config ({t['config_epochs']} epochs max, {t['config_time_budget_s']:.0f} s budget): "
             f"at most {min(t['estimated_seconds_for_config_epochs'], t['config_time_budget_s']) / 60:.1f} min per "
             f"student (5 min target)."]
    if "student_stage" in t:
        s = t["student_stage"]
        lines.append(f"- `distillrec student` (the stage config, device {s.get('device')}, "
                     f"{s.get('torch_threads') or '?'} torch threads): {s['train_seconds']:.0f} s, {s['epochs_run']} "
                     f"epochs, stopped by {s['stop_reason']} (best epoch {s['best_epoch']}).")
    return lines + [""]


def _md_variants(rep: dict) -> list[str]:
    lines = ["## Variants", "", "| key | row | KD components in force | runs |", "| --- | --- | --- | --- |"]
    for key, v in rep["variants"].items():
        if v.get("skipped"):
            lines.append(f"| {key} | {v['label']} | {v['skipped']} | 0 |")
            continue
        comp = ", ".join(f"{k}={val}" for k, val in v.get("components", {}).items())
        runs = "; ".join(f"seed {r['seed']}: {r['epochs_run']} ep" + (f" = {r['steps']} steps" if "steps" in r else "")
                         + f", {r['stop_reason']}" for r in v["runs"])
        lines.append(f"| {key} | {v['label']} | {comp} | {runs} |")
    return lines + ["", "KD components: alpha = hard/teacher mixing weight; scope = next_item KL support (topk | catalog); "
                    "kl, listwise, rank, rating, like = weights inside each task's KD term (rank = the DLLM2Rec ranking "
                    "distillation); align = representation-alignment weight. See docs/distillation.md.", ""]
