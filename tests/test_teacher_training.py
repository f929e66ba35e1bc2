"""Teacher training loop: resume after a real SIGKILL gives the uninterrupted result; 2-rank DDP (gloo), started by
torchrun or by `accelerate launch`, keeps the ranks' weights identical and only rank 0 writes artifacts."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launchers import LAUNCHERS

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["-o", "teacher.max_steps=8", "-o", "teacher.checkpoint_every=2", "-o", "teacher.time_budget_s=600"]


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1", **extra)
    return env


def _new_run(tmp_path, name) -> Path:
    cmd = [sys.executable, "-m", "distillrec", "data", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "-o", f"out_dir={tmp_path}", "-o", f"name={name}"]
    subprocess.run(cmd, check=True, cwd=ROOT, env=_env(), capture_output=True)
    return tmp_path / name


def _teacher_cmd(run: Path):
    return [sys.executable, "-m", "distillrec", "teacher", str(run), *STEPS]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    run = _new_run(tmp, "straight")
    subprocess.run(_teacher_cmd(run), check=True, cwd=ROOT, env=_env(), capture_output=True, timeout=600)
    return json.loads((run / "teacher" / "metrics.json").read_text())


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, uninterrupted):
    run = _new_run(tmp_path, "killed")
    proc = subprocess.Popen(_teacher_cmd(run), cwd=ROOT, env=_env(DISTILLREC_STEP_SLEEP="0.4"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = run / "teacher" / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= 5:
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "teacher" / "metrics.json").exists()
    ckpt = run / "teacher" / "checkpoint" / "last.pt"
    assert ckpt.exists()
    assert not list(ckpt.parent.glob(".*.tmp"))  # no half-written checkpoint left behind

    out = subprocess.run(_teacher_cmd(run), check=True, cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert re.search(r"resuming from step [2-8]\b", out.stdout), out.stdout[-2000:]
    resumed = json.loads((run / "teacher" / "metrics.json").read_text())
    assert resumed["budget"]["steps"] == uninterrupted["budget"]["steps"] == 8
    assert resumed["trainable_weight_digest"] == pytest.approx(uninterrupted["trainable_weight_digest"], rel=1e-9, abs=1e-9)
    for task, metric in (("next_item", "NDCG@10"), ("rating", "RMSE"), ("like", "AUC")):
        assert resumed["metrics"][task][metric]["value"] == pytest.approx(
            uninterrupted["metrics"][task][metric]["value"], abs=1e-6)
    lines = (run / "teacher" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 9))  # each step logged once


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_ddp_two_ranks_gloo_same_weights_rank0_writes(tmp_path, launcher, free_port):
    run = _new_run(tmp_path, "ddp")
    cmd = [*LAUNCHERS[launcher](free_port),
           "-m", "distillrec", "teacher", str(run), "-o", "teacher.max_steps=3", "-o", "teacher.checkpoint_every=1"]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d) trainable-weight digest (\S+)", out.stdout))
    assert set(digests) == {"0", "1"}, out.stdout[-2000:]
    assert float(digests["0"]) == pytest.approx(float(digests["1"]), rel=1e-7)
    metrics = json.loads((run / "teacher" / "metrics.json").read_text())
    assert metrics["budget"]["world_size"] == 2
    assert metrics["trainable_weight_digest"] == pytest.approx(float(digests["0"]), rel=1e-9)
    log = (run / "teacher" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 3  # written once (rank 0), not once per rank
