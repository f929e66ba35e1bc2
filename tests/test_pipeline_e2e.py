"""End to end on the tiny preset: a random 2-layer Llama teacher on a few ML-100K users runs every stage
through the CLI; the artifacts, the ONNX parity and the report are checked."""
import json
from pathlib import Path

import numpy as np
import pytest

from distill.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    rc = main(["run", "--config", str(ROOT / "configs" / "tiny.yaml"), "-o", f"out_dir={out}", "-o", "name=e2e"])
    assert rc == 0
    return out / "e2e"


def test_artifacts_exist(run_dir):
    expected = ["config.yaml", "data_stats.json",
                "teacher/adapter/adapter_config.json", "teacher/adapter/adapter_model.safetensors",
                "teacher/heads.safetensors", "teacher/metrics.json", "teacher/train_log.jsonl",
                "teacher_cache/cache.npz", "teacher_cache/manifest.json",
                "student/model.safetensors", "student/config.json", "student/metrics.json",
                "student_nokd/model.safetensors", "student_nokd/metrics.json",
                "onnx/student.onnx", "onnx/runtime.json", "onnx/parity.json",
                "bench/report.json", "bench/report.md", "bench/latency.png"]
    missing = [p for p in expected if not (run_dir / p).exists()]
    assert not missing, missing


def test_teacher_log_has_every_unweighted_loss_and_total(run_dir):
    lines = (run_dir / "teacher" / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == 4  # tiny preset: max_steps 4
    rec = json.loads(lines[0])
    assert set(rec["losses"]) == {"next_item", "rating", "like"}
    expected = sum(rec["weights"][t] * rec["losses"][t] for t in rec["losses"])
    assert rec["total"] == pytest.approx(expected, rel=1e-5)


def test_cache_covers_every_training_position_of_cached_users(run_dir):
    from distill.config import DataConfig
    from distill.data import Split, load_dataset
    split = Split.leave_last_out(load_dataset(DataConfig()))
    with np.load(run_dir / "teacher_cache" / "cache.npz") as z:
        users, offsets, top = z["users"], z["offsets"], z["next_topk_items"]
        logits = z["next_topk_logits"].astype(np.float32)
    assert len(users) == 12
    assert offsets[-1] == sum(split.n_train[u] for u in users) == len(top)
    assert np.all(np.diff(logits, axis=1) <= 1e-3)  # top-K sorted descending
    man = json.loads((run_dir / "teacher_cache" / "manifest.json").read_text())
    assert man["data_hash"] == split.ds.data_hash and man["rows"] == len(top)


def test_parity_passed(run_dir):
    parity = json.loads((run_dir / "onnx" / "parity.json").read_text())
    assert parity["passed"] is True
    assert max(parity["max_abs_diff"].values()) < 1e-4


def test_report_has_teacher_and_students_side_by_side(run_dir):
    rep = json.loads((run_dir / "bench" / "report.json").read_text())
    names = list(rep["latency"])
    assert any(n.startswith("teacher") for n in names)
    assert "student (PyTorch)" in names and any(n.startswith("student (ONNX)") for n in names)
    for rows in rep["latency"].values():
        for st in rows.values():
            assert st["p50_ms"] > 0 and st["p99_ms"] >= st["p50_ms"]
    teacher = next(n for n in names if n.startswith("teacher"))
    assert rep["latency"][teacher]["1"]["speedup_p50_vs_teacher"] == pytest.approx(1.0)
    rows = rep["quality_teacher_subset"]["rows"]
    assert {"teacher", "student", "student (no KD)", "popularity", "item_mean"} <= set(rows)
    assert rep["quality_teacher_subset"]["users"] == 24
    assert rep["quality_all_users"]["users"] == 943
    for name in ("teacher", "student"):
        ndcg = rows[name]["next_item"]["NDCG@10"]
        assert 0 <= ndcg["ci"][0] <= ndcg["value"] <= ndcg["ci"][1] <= 1
    md = (run_dir / "bench" / "report.md").read_text()
    assert "teacher" in md and "student (ONNX)" in md and "NDCG@10" in md


def test_onnx_quality_equals_pytorch_student(run_dir):
    rep = json.loads((run_dir / "bench" / "report.json").read_text())
    rows = rep["quality_all_users"]["rows"]
    onnx = next(k for k in rows if k.startswith("student (ONNX)"))
    for task, metric in (("next_item", "NDCG@10"), ("rating", "RMSE"), ("like", "AUC")):
        assert rows[onnx][task][metric]["value"] == pytest.approx(rows["student"][task][metric]["value"], abs=1e-4)


def test_single_stage_reruns_on_existing_folder(run_dir):
    assert main(["export", str(run_dir)]) == 0


def test_stage_without_inputs_names_the_stage_to_run(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="distillrec run --config"):
        main(["student", str(tmp_path / "empty")])
