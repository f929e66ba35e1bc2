"""The ablation on the tiny preset: a random tiny teacher + cache, then run_ablation with 2 seeds and 1 short
epoch per model; the report's rows, counts, finiteness and CIs are checked (not the quality)."""
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from distill.ablation import (POPULARITY_FACTOR, RANK_KD_WEIGHT, VARIANTS, _below_popularity, _resolve_overrides,
                              _skip_reason, aggregate_seeds, paired_difference, report_paths, run_ablation)
from distill.cache import build_cache
from distillrec.cli import _write_run_config
from distill.config import load_config
from distill.data import Split, load_dataset
from distill.metrics import format_metrics_table
from distill.student_stage import cold_item_slice
from distill.teacher_stage import train_teacher

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["kd_full", "no_kl", "no_kd", "rank_kd", "cold_text", "cold_id_drop", "cold_id_only"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"out_dir={out}", "name=x", "teacher.max_steps=2", "teacher.eval_users=16",
        "student.ablation_seeds=[0, 1]", "student.ablation_epochs=1", "student.max_steps_per_epoch=2",
        "student.batch_size=64",
        "student.ablation_n_boot=100", f"student.ablation_variants={json.dumps(KEYS)}"])
    _write_run_config(cfg)
    train_teacher(cfg)
    build_cache(cfg)
    rep = run_ablation(cfg, log=lambda *_: None)
    return dict(cfg=cfg, rep=rep, run=out / "x")


def _entries(rows):
    for name, metrics in rows.items():
        for task in ("next_item", "rating", "like"):
            for metric, e in (metrics.get(task) or {}).items():
                yield name, f"{task}/{metric}", e


def test_report_files_are_written(report):
    """The ablation writes its own report, ablation/report.{json,md}, and nothing under bench/ or student/."""
    run = report["run"]
    json_path, md_path = report_paths(run)
    assert (json_path, md_path) == (run / "ablation" / "report.json", run / "ablation" / "report.md")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(report["rep"]))
    assert sorted(p.name for p in json_path.parent.iterdir()) == ["report.json", "report.md"]
    assert not (run / "bench").exists() and not (run / "student" / "report.json").exists()
    md = md_path.read_text()
    for text in ("## Targets", "## All test users (943)", "## Teacher's evaluation users (16", "## Cold start",
                 "## Parameters", "## Training time", "next_item/NDCG@10", VARIANTS["no_kl"][0],
                 "1 epochs of 2 optimizer steps", "= 2 steps"):
        assert text in md, text
    # every target is a row of the Markdown table with its verdict
    for t in report["rep"]["targets"]:
        assert f"| {t['target']} | {'**yes**' if t['met'] else '**no**'} |" in md


def test_bench_report_reads_the_ablation_report(report):
    from distill.config import config_to_dict
    from serve_bench.report import load_ablation
    cfg = report["cfg"]
    ab = load_ablation(report["run"], load_dataset(cfg.data).data_hash, config_to_dict(cfg)["student"])
    assert "missing" not in ab and ab["stale"] == []
    assert ab["targets"] == report["rep"]["targets"] and ab["all_users"]["users"] == 943
    assert ab["seeds"] == [0, 1] and ab["ratio_params"] == report["rep"]["params"]["ratio_params"]
    assert ab["report_md"] == "ablation/report.md"


def test_rows_and_counts(report):
    rep = report["rep"]
    labels = {k: VARIANTS[k][0] for k in KEYS}
    all_rows = rep["all_users"]["rows"]
    assert rep["all_users"]["users"] == 943
    assert set(all_rows) == {labels[k] for k in KEYS[:4]} | {"popularity", "global_mean", "user_mean", "item_mean"}
    sub = rep["teacher_subset"]["rows"]
    assert rep["teacher_subset"]["users"] == 16 and "teacher" in sub and labels["kd_full"] in sub
    assert sub["teacher"]["n_users"] == 16 and sub[labels["no_kd"]]["n_users"] == 16
    for k in KEYS:
        runs = rep["variants"][k]["runs"]
        assert [r["seed"] for r in runs] == [0, 1]
        assert all(r["epochs_run"] == 1 for r in runs)
        # the stage's budget rule: max(one pass, min_steps_per_epoch) steps per epoch, capped here at 2
        assert all(r["steps"] == r["steps_per_epoch"] == 2 for r in runs)
    assert rep["variants"]["no_kl"]["components"]["kl"] == 0.0 and rep["variants"]["kd_full"]["components"]["kl"] > 0
    assert rep["variants"]["no_kd"]["components"]["alpha"] == 0.0
    # the rank_kd row is kd_full with the ranking distillation on (the config has it off: RANK_KD_WEIGHT)
    assert rep["variants"]["kd_full"]["components"]["rank"] == 0.0
    assert rep["variants"]["rank_kd"]["overrides"] == {"kd_rank": RANK_KD_WEIGHT}
    rank_c, full_c = rep["variants"]["rank_kd"]["components"], rep["variants"]["kd_full"]["components"]
    assert rank_c == dict(full_c, rank=RANK_KD_WEIGHT)
    assert all(r["teacher_coverage"] > 0 for r in rep["variants"]["kd_full"]["runs"])
    assert all(r["teacher_coverage"] == 0 for r in rep["variants"]["no_kd"]["runs"])


def test_cold_start_slice_and_events(report):
    rep, cfg = report["rep"], report["cfg"]
    split = Split.leave_last_out(load_dataset(cfg.data))
    cold = cold_item_slice(split.ds.n_items, cfg.student.cold_item_fraction, cfg.student.cold_item_seed)
    targets, _ = split.targets(split.eval_users, "test")
    n_events = int(np.isin(targets, cold).sum())
    cs = rep["cold_start"]
    assert cs["items"] == len(cold) == 84 and cs["test_events"] == n_events > 0
    rows = cs["rows"]
    assert {VARIANTS["cold_text"][0], VARIANTS["cold_id_drop"][0], VARIANTS["cold_id_only"][0], "popularity"} <= set(rows)
    # the ID-dropout row resolves its placeholder: the config has none, so COLD_ID_DROPOUT
    assert cfg.student.id_dropout == 0 and rep["variants"]["cold_id_drop"]["overrides"] == {"id_dropout": 0.3}
    assert rows[VARIANTS["cold_text"][0]]["n_users"] == n_events
    # the ID-only student has no text table: fewer buffers, and no text projection
    p = rep["params"]["per_variant"]
    assert p[VARIANTS["cold_id_only"][0]]["buffers"] < p[VARIANTS["cold_text"][0]]["buffers"]


def test_numbers_are_finite_and_cis_bracket_their_values(report):
    rep = report["rep"]
    n = 0
    for section in (rep["all_users"]["rows"], rep["teacher_subset"]["rows"], rep["cold_start"]["rows"]):
        for name, metric, e in _entries(section):
            lo, hi = e["ci"]
            point = e.get("ci_value", e["value"])
            assert all(math.isfinite(x) for x in (e["value"], lo, hi, point)), (name, metric)
            assert lo - 1e-9 <= point <= hi + 1e-9, (name, metric, e)
            if "seeds" in e:
                assert len(e["seeds"]) == 2 and e["std"] >= 0
                assert e["value"] == pytest.approx(np.mean(e["seeds"]))
                assert point == e["seeds"][0]
            n += 1
    assert n > 100


def test_params_targets_and_timing(report):
    rep = report["rep"]
    p = rep["params"]
    t_params = json.loads((report["run"] / "teacher" / "metrics.json").read_text())["params"]["total"]
    assert p["teacher_total"] == t_params
    assert p["ratio_params"] == pytest.approx(p["student_params"] / t_params)
    names = [t["target"] for t in rep["targets"]]
    assert sum("student >= teacher" in n for n in names) == 3
    # the no-KD student against popularity, with the numbers of the all-users table
    pop_t = next(t for t in rep["targets"] if "x popularity" in t["target"])
    rows = rep["all_users"]["rows"]
    no, pop = (rows[k]["next_item"]["NDCG@10"]["value"] for k in (VARIANTS["no_kd"][0], "popularity"))
    assert pop_t["met"] is bool(no >= POPULARITY_FACTOR * pop) and f"{no:.4f} / {pop:.4f}" in pop_t["detail"]
    # every trained row below popularity is flagged, no baseline is
    below = {b["row"] for b in rep["below_popularity"]}
    assert below == {k for k, r in rows.items() if k not in ("popularity", "global_mean", "user_mean", "item_mean")
                     and r["next_item"]["NDCG@10"]["value"] < pop}
    assert any("beyond the seed spread" in n for n in names) and any("2%" in n for n in names)
    assert all(isinstance(t["met"], bool) for t in rep["targets"])
    # the tiny teacher is smaller than the student: the size target must be reported as missed
    assert next(t for t in rep["targets"] if "2%" in t["target"])["met"] is False
    tt = rep["training_time"]
    assert tt["per_model_budget"]["epochs"] == 1 and len(tt["kd_full_train_seconds"]) == 2
    assert tt["per_model_budget"]["max_steps"] == 2 and tt["per_model_budget"]["min_steps_per_epoch"] == 0
    assert tt["ablation_total_seconds"] > 0
    assert tt["runs_cut_by_time_budget"] == []  # 1 epoch per model: epochs bind, never the 60 s cap


def test_rank_kd_row_resolves_its_weight_and_is_skipped_when_already_on():
    sc = load_config(ROOT / "configs" / "tiny.yaml").student
    label, overrides, use_teacher, cold = VARIANTS["rank_kd"]
    assert use_teacher and not cold
    assert sc.kd_rank == 0.0 and _resolve_overrides(sc, overrides) == {"kd_rank": RANK_KD_WEIGHT}
    assert _skip_reason(sc, "rank_kd", _resolve_overrides(sc, overrides)) is None
    on = replace(sc, kd_rank=0.3)  # a config with the loss on keeps its own weight: the row equals kd_full
    assert _resolve_overrides(on, overrides) == {"kd_rank": 0.3}
    assert "already on" in _skip_reason(on, "rank_kd", _resolve_overrides(on, overrides))
    # the one-component-off rows keep their rule; kd_full, no_kd and the cold rows are never skipped
    assert "already off" in _skip_reason(replace(sc, kd_listwise=0.0), "no_listwise", {"kd_listwise": 0.0})
    assert _skip_reason(sc, "no_listwise", {"kd_listwise": 0.0}) is None
    for key in ("kd_full", "no_kd", "cold_text", "cold_id_drop"):
        assert _skip_reason(sc, key, _resolve_overrides(sc, VARIANTS[key][1])) is None


def test_aggregate_and_paired_difference_units():
    per_seed = [{"next_item": {"NDCG@10": {"value": v, "ci": [v - 0.1, v + 0.1]}}, "n_users": 5} for v in (0.2, 0.4)]
    agg = aggregate_seeds(per_seed)["next_item"]["NDCG@10"]
    assert agg["value"] == pytest.approx(0.3) and agg["std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert agg["ci"] == pytest.approx([0.1, 0.3]) and agg["ci_value"] == 0.2
    assert "± " in format_metrics_table({"s": aggregate_seeds(per_seed)})

    split = Split.leave_last_out(load_dataset(load_config(ROOT / "configs" / "tiny.yaml").data))
    users = split.eval_users[:60]
    rng = np.random.default_rng(0)
    pred = dict(users=users, scores=rng.normal(size=(60, split.ds.n_items)).astype(np.float32),
                rating=rng.uniform(1, 5, 60).astype(np.float32), like_logit=rng.normal(size=60).astype(np.float32))
    same = paired_difference(pred, pred, split, n_boot=50)
    for task, metric in (("next_item", "NDCG@10"), ("rating", "RMSE"), ("like", "AUC")):
        assert same[task][metric]["value"] == 0 and same[task][metric]["ci"] == [0.0, 0.0]
    targets, true_r = split.targets(users, "test")
    better = dict(pred, rating=true_r.astype(np.float32))  # a perfect rating model
    better["scores"] = pred["scores"].copy()
    better["scores"][np.arange(60), targets] = 1e3  # and a perfect ranker
    d = paired_difference(better, pred, split, n_boot=50)
    assert d["rating"]["RMSE"]["ci"][1] < 0 and d["next_item"]["NDCG@10"]["ci"][0] > 0


def test_rows_below_popularity_are_flagged():
    def row(v):
        return {"next_item": {"NDCG@10": {"value": v}}}
    rows = {"student": row(0.05), "weak student": row(0.03), "popularity": row(0.04), "item_mean": {"rating": {}}}
    assert _below_popularity(rows) == [dict(row="weak student", ndcg10=0.03, popularity_ndcg10=0.04)]
    assert _below_popularity({"student": row(0.01)}) == []  # no popularity row (a log without it): nothing to flag
