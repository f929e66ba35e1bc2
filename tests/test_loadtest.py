"""The bounded load test of the HTTP service: a real uvicorn on 127.0.0.1 over a tiny exported student."""
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
service = pytest.importorskip("export.service", reason="export/service.py (the HTTP service) is not there yet")

from distill.config import ExportConfig, StudentConfig  # noqa: E402
from distill.student import Student  # noqa: E402
from serve_bench.loadtest import HOST, drive, free_port, run_loadtest, start_service, stop_service  # noqa: E402

N_ITEMS = 30
IDS = [f"i{k}" for k in range(N_ITEMS)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from export.onnx_export import export_run
    run = tmp_path_factory.mktemp("lt_run")
    torch.manual_seed(1)
    m = Student(StudentConfig(dim=16, layers=1, heads=2, max_len=12, tower_hidden=16), N_ITEMS,
                ["next_item", "rating", "like"], text_vectors=torch.randn(N_ITEMS, 8)).eval()
    m.save(run / "student", extra=dict(item_ids=IDS, like_threshold=4.0, max_history=10,
                                       item_popularity=list(range(N_ITEMS)), data_hash="x"))
    export_run(run, ExportConfig(), seed=0)
    return run


@pytest.fixture(scope="module")
def live_port(run_dir):
    port = free_port()
    proc = start_service(run_dir / "onnx", port)
    yield port
    stop_service(proc)
    assert proc.poll() is not None  # the service is gone after the test


def test_run_loadtest_zero_errors_and_stops_by_itself(run_dir):
    t0 = time.perf_counter()
    out = run_loadtest(run_dir, clients=4, seconds=1.5)
    took = time.perf_counter() - t0
    assert out["errors"] == 0, out["error_examples"]
    assert out["ok"] > 0 and out["requests"] == out["ok"] and out["host"] == HOST == "127.0.0.1"
    assert 0 < out["p50_ms"] <= out["p99_ms"] and out["throughput_rps"] > 0
    assert out["stopped_by"] == "time" and out["clients"] == 4
    assert out["requests_from"].startswith("random catalog ids")  # no config.yaml in this folder
    assert out["service_exit_code"] is not None  # the service process was stopped
    assert took < 1.5 + 60  # bounded: start-up + T + shutdown, never open-ended


def test_drive_respects_max_requests(live_port):
    bodies = [{"history": ["i1", "i2"], "ratings": [5, 3], "k": 3}, {"history": ["i4"], "k": 5}]
    out = drive(live_port, bodies, clients=3, seconds=30, max_requests=25)
    assert out["requests"] == 25 and out["errors"] == 0 and out["stopped_by"] == "max_requests"


def test_drive_counts_errors(live_port):
    bad = [{"history": ["not-an-item"], "k": 3}, {"history": "i1"}]  # unknown id (400), wrong type (422)
    out = drive(live_port, bad, clients=2, seconds=30, max_requests=10)
    assert out["errors"] == 10 and out["ok"] == 0 and "p50_ms" not in out
    assert any("HTTP 400" in e for e in out["error_examples"]) and any("HTTP 422" in e for e in out["error_examples"])


def test_drive_counts_a_dead_server_as_errors():
    port = free_port()  # nothing listens there
    out = drive(port, [{"history": ["i1"]}], clients=2, seconds=0.5, max_requests=6, timeout=1.0)
    assert out["errors"] == 6 and out["ok"] == 0


def test_bad_arguments(run_dir, tmp_path):
    with pytest.raises(ValueError):
        drive(1, [{}], clients=0, seconds=1)
    with pytest.raises(FileNotFoundError, match="distillrec export"):
        run_loadtest(tmp_path, clients=1, seconds=0.1)
    assert np.isfinite(free_port())
