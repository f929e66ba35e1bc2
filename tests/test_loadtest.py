"""The bounded load test of the HTTP service: a real uvicorn on 127.0.0.1 over a tiny exported student."""
import socket

import pytest

# the service's optional web stack: without it there is nothing to load-test (skip); any other import error fails
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import export.service  # noqa: E402,F401 - a broken service module is a failure here, not a skip
from serve_bench.loadtest import HOST, drive, free_port, run_loadtest, start_service, stop_service  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(serving_export):
    """A run folder holding only onnx/ (tests/conftest.py's tiny exported student; no config.yaml)."""
    return serving_export.onnx_dir.parent


@pytest.fixture(scope="module")
def ids(serving_export):
    return serving_export.item_ids


@pytest.fixture(scope="module")
def live_port(run_dir):
    port = free_port()
    proc = start_service(run_dir / "onnx", port)
    yield port
    stop_service(proc)
    assert proc.poll() is not None  # the service is gone after the test


def test_run_loadtest_zero_errors_and_stops_by_itself(run_dir):
    out = run_loadtest(run_dir, clients=4, seconds=1.5)
    assert out["errors"] == 0, out["error_examples"]
    assert out["ok"] > 0 and out["requests"] == out["ok"] and out["host"] == HOST == "127.0.0.1"
    assert 0 < out["p50_ms"] <= out["p99_ms"] and out["throughput_rps"] > 0
    assert out["stopped_by"] == "time" and out["clients"] == 4
    assert out["requests_from"].startswith("random catalog ids")  # no config.yaml in this folder
    assert out["service_exit_code"] is not None  # the service process was stopped


def test_drive_respects_max_requests(live_port, ids):
    bodies = [{"history": [ids[1], ids[2]], "ratings": [5, 3], "k": 3}, {"history": [ids[4]], "k": 5}]
    out = drive(live_port, bodies, clients=3, seconds=30, max_requests=25)
    assert out["requests"] == 25 and out["errors"] == 0 and out["stopped_by"] == "max_requests"


def test_drive_counts_errors(live_port, ids):
    bad = [{"history": ["not-an-item"], "k": 3}, {"history": ids[1]}]  # unknown id (400), wrong type (422)
    out = drive(live_port, bad, clients=2, seconds=30, max_requests=10)
    assert out["errors"] == 10 and out["ok"] == 0 and "p50_ms" not in out
    assert any("HTTP 400" in e for e in out["error_examples"]) and any("HTTP 422" in e for e in out["error_examples"])


def test_drive_counts_a_dead_server_as_errors(ids):
    port = free_port()  # nothing listens there
    out = drive(port, [{"history": [ids[1]]}], clients=2, seconds=0.5, max_requests=6, timeout=1.0)
    assert out["errors"] == 6 and out["ok"] == 0


def test_free_port_is_bindable_on_the_load_test_host():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, port))  # raises OSError if the port were taken or not on 127.0.0.1
        s.listen(1)
        assert s.getsockname() == (HOST, port)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="clients must be >= 1"):
        drive(1, [{}], clients=0, seconds=1)
    with pytest.raises(ValueError, match="seconds > 0"):
        drive(1, [{}], clients=1, seconds=0)
    with pytest.raises(FileNotFoundError, match="distillrec export"):
        run_loadtest(tmp_path, clients=1, seconds=0.1)


def test_start_service_reports_a_service_that_cannot_start(tmp_path):
    with pytest.raises(RuntimeError, match="exited with code"):
        start_service(tmp_path / "no_such_onnx_dir", free_port(), startup_timeout=60)
