"""serve_bench machinery: timing / percentiles (fake clock, no time asserted), workload building, the RSS
probe in its own process, the floor on a known graph, the profile, targets and the report writer from a
synthetic report dict."""
import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from distill.config import ExportConfig, StudentConfig
from distill.student import Student
from serve_bench import floor as F
from serve_bench.bench import add_speedups, evaluate_targets, point_grid
from serve_bench.probe import measure_rss
from serve_bench.report import load_ablation, refresh_ablation, render_markdown, write_report
from serve_bench.timing import summarize, time_calls, time_concurrent
from serve_bench.workload import RequestSet, candidates_for, top_k_unseen

N_ITEMS = 40


# ------------------------------------------------------------------------------------------------ timing
class FakeClock:
    """clock() returns the fake time; the fake function advances it."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make_fn(clock, dt, warm_dt=None, warmup=0):
    calls = []

    def fn(batch):
        calls.append(batch)
        clock.t += warm_dt if (warm_dt is not None and len(calls) <= warmup) else dt
    return fn, calls


def test_time_calls_excludes_warmup_and_needs_both_minimums():
    clock = FakeClock()
    fn, calls = make_fn(clock, dt=1 / 64, warm_dt=5.0, warmup=3)  # exact binary fractions: no rounding drift
    st = time_calls(fn, ["a", "b", "c"], warmup=3, min_samples=10, min_seconds=0.5, clock=clock)
    # 10 samples are not enough: 0.5 s at 15.625 ms per call needs 32 calls
    assert st["samples"] == 32 and len(calls) == 35
    assert st["max_ms"] == pytest.approx(15.625) and st["p50_ms"] == pytest.approx(15.625)  # no 5 s warm-up call
    assert st["stopped_by"] == "min_samples+min_seconds" and st["warmup"] == 3
    assert calls[:6] == ["a", "b", "c", "a", "b", "c"]  # round robin, warm-up included in the rotation

    clock = FakeClock()
    fn, calls = make_fn(clock, dt=0.125)
    st = time_calls(fn, [0], warmup=0, min_samples=10, min_seconds=0.5, clock=clock)
    assert st["samples"] == 10 and st["wall_s"] == pytest.approx(1.25)  # here the sample count decides


def test_time_calls_caps_and_at_least_one_sample():
    clock = FakeClock()
    fn, _ = make_fn(clock, dt=0.1)
    st = time_calls(fn, [0], 0, min_samples=200, min_seconds=2.0, max_samples=3, clock=clock)
    assert st["samples"] == 3 and st["stopped_by"] == "max_samples"
    clock = FakeClock()
    fn, _ = make_fn(clock, dt=0.125)
    st = time_calls(fn, [0], 0, min_samples=200, min_seconds=2.0, max_seconds=0.3, clock=clock)
    assert st["samples"] == 3 and st["stopped_by"] == "max_seconds"
    clock = FakeClock()
    fn, _ = make_fn(clock, dt=0.1)
    st = time_calls(fn, [0], 0, min_samples=200, min_seconds=2.0, max_seconds=0.0, clock=clock)
    assert st["samples"] == 1
    with pytest.raises(ValueError):
        time_calls(fn, [], 0, 1, 0.0)


def test_summarize_percentiles_per_request_and_throughput():
    lat = np.arange(1, 101, dtype=float)  # 1..100 ms
    st = summarize(lat, batch_size=4)
    for q in (50, 90, 99):
        assert st[f"p{q}_ms"] == pytest.approx(np.percentile(lat, q))
        assert st[f"per_request_p{q}_ms"] == pytest.approx(np.percentile(lat, q) / 4)
    assert st["samples"] == 100 and st["busy_s"] == pytest.approx(5.05)
    assert st["throughput_rps"] == pytest.approx(400 / 5.05)
    with pytest.raises(ValueError):
        summarize([], 1)


def test_time_concurrent_counts_every_thread():
    seen = []

    def fn(batch):
        seen.append(batch)
        time.sleep(0.0005)
    st = time_concurrent(fn, [1, 2, 3], threads=3, warmup=2, min_samples=30, min_seconds=0.05, max_seconds=20)
    assert st["samples"] >= 30 and st["threads"] == 3 and len(st["per_thread_samples"]) == 3
    assert all(n > 0 for n in st["per_thread_samples"]) and sum(st["per_thread_samples"]) == st["samples"]
    assert len(seen) >= st["samples"] + 6  # warm-up calls happened, untimed

    def boom(batch):
        raise RuntimeError("broken system")
    with pytest.raises(RuntimeError, match="broken system"):
        time_concurrent(boom, [1], threads=2, warmup=0, min_samples=5, min_seconds=0.01, max_seconds=5)


# ------------------------------------------------------------------------------------------------ workload
def random_set(n=10, L=8, C=5, seed=0, name="natural"):
    rng = np.random.default_rng(seed)
    length = rng.integers(1, L + 1, size=n)
    length[0] = L
    items = np.zeros((n, L), np.int64)
    ratings = np.zeros((n, L), np.float32)
    for r, k in enumerate(length):
        items[r, L - k:] = rng.choice(N_ITEMS, size=k, replace=False)
        ratings[r, L - k:] = rng.integers(1, 6, size=k)
    cand = rng.integers(0, N_ITEMS, size=(n, C))
    return RequestSet(name, np.arange(n), items, ratings, length.astype(np.int64), cand)


def test_request_batches_wrap_and_trim():
    rs = random_set(n=10, L=8, C=5)
    bs = rs.batches(4, n_candidates=3)
    assert len(bs) == 3 and all(b[0].shape[0] == 4 for b in bs)  # the last batch wraps around
    assert bs[2][2].tolist() == rs.length[[8, 9, 0, 1]].tolist()
    for items, ratings, length, cand in bs:
        assert items.shape[1] == max(1, length.max()) and cand.shape[1] == 3 and ratings.shape == items.shape
    big = rs.batches(32, 1)  # a batch larger than the request set repeats requests
    assert len(big) == 1 and big[0][0].shape[0] == 32
    rows = np.array([1, 2])
    short = rs.batch(rows, 1)
    L = rs.items.shape[1]
    Lb = short[0].shape[1]
    assert np.array_equal(short[0], rs.items[rows, L - Lb:])


def test_top_k_unseen_masks_the_history():
    scores = np.tile(np.arange(N_ITEMS, dtype=np.float32), (2, 1))  # item 39 best
    items = np.array([[0, 39, 38], [5, 6, 7]])
    length = np.array([2, 3])  # row 0: padding slot holds item 0, history = [39, 38]
    top = top_k_unseen(scores, items, length, 3)
    assert top[0].tolist() == [37, 36, 35]
    assert top[1].tolist() == [39, 38, 37]


def test_candidates_target_first_and_unseen():
    class DS:
        n_items = N_ITEMS

    class FakeSplit:
        ds = DS()

        def targets(self, users, stage):
            return np.array([u + 1 for u in users]), None

        def seen(self, u, stage):
            return np.arange(10 + u)

    cand = candidates_for(FakeSplit(), np.array([0, 3]), 12, seed=0)
    assert cand.shape == (2, 12) and cand[:, 0].tolist() == [1, 4]
    for row, u in enumerate([0, 3]):
        rest = cand[row, 1:]
        assert len(set(rest.tolist())) == 11 and rest.min() >= 10 + u and u + 1 not in rest
    assert np.array_equal(cand, candidates_for(FakeSplit(), np.array([0, 3]), 12, seed=0))  # seeded


def test_point_grid_teacher_vs_student():
    class BC:
        batch_sizes = [1, 8, 32]
        teacher_batch_sizes = [1, 8]
        fixed_batch_sizes = [1, 32]
        single_thread_batch_sizes = [1]
    sets = {"natural": None, "fixed50": None}
    student = point_grid(BC, sets, teacher=False)
    teacher = point_grid(BC, sets, teacher=True)
    assert ("fixed50", "topk", 1, 1) in student and not any(p[3] == 1 for p in teacher)
    assert {p[2] for p in teacher} == {1, 8} and ("natural", "candidates", 32, "all") in student
    assert ("fixed50", "topk", 32, "all") not in teacher


# ------------------------------------------------------------------------------------------------ a tiny student
@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    from export.onnx_export import export_run
    run = tmp_path_factory.mktemp("bench_run")
    torch.manual_seed(0)
    m = Student(StudentConfig(dim=16, layers=1, heads=2, max_len=12, tower_hidden=16), N_ITEMS,
                ["next_item", "rating", "like"], text_vectors=torch.randn(N_ITEMS, 8)).eval()
    m.save(run / "student", extra=dict(item_ids=[f"m{i}" for i in range(N_ITEMS)], like_threshold=4.0,
                                       max_history=10, item_popularity=list(range(N_ITEMS)), data_hash="x"))
    export_run(run, ExportConfig(), seed=0)
    return run / "onnx"


def test_rss_probe_runs_in_its_own_process(onnx_dir, tmp_path):
    rs = random_set(n=6, L=8, C=3)
    rs.save(tmp_path / "req.npz")
    r = measure_rss(dict(kind="student_onnx", onnx_dir=str(onnx_dir), variant="fp32", requests=str(tmp_path / "req.npz"),
                         batch=2, calls=3, top_k=5), timeout=120)
    assert "error" not in r, r
    assert r["peak_rss_mb"] > 0 and r["baseline_rss_mb"] > 0 and r["peak_rss_mb"] >= r["baseline_rss_mb"]
    assert r["provider"] == "CPUExecutionProvider" and r["calls"] == 3
    import os
    assert r["pid"] != os.getpid()
    bad = measure_rss(dict(kind="nope", requests=str(tmp_path / "req.npz")), timeout=60)
    assert "error" in bad and "nope" in bad["error"]


# ------------------------------------------------------------------------------------------------ floor
def known_graph(path: Path):
    """y = (x @ W1) -> Gemm(transB) : x [B, 8], W1 [8, 16], W2 [4, 16] (transB) -> [B, 4]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((4, 16)).astype(np.float32), "W2"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "known", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_flops_of_a_known_graph(tmp_path):
    path = known_graph(tmp_path / "known.onnx")
    got = F.count_matmul_flops(path, {"x": np.ones((3, 8), np.float32)})
    assert got["matmul_nodes"] == 2
    assert got["flops"] == 2 * 3 * 8 * 16 + 2 * 3 * 16 * 4
    assert got["by_op"] == {"MatMul": 2 * 3 * 8 * 16, "Gemm": 2 * 3 * 16 * 4}


def test_flops_of_the_student_grow_with_history(onnx_dir):
    rs = random_set(n=2, L=8, C=3)
    short = F.count_matmul_flops(onnx_dir / "student.onnx", F.feed_of(rs.batch(np.array([1]), 1)))
    full = F.count_matmul_flops(onnx_dir / "student.onnx", F.feed_of(rs.batch(np.array([0]), 1)))
    assert 0 < short["flops"] <= full["flops"] and full["matmul_nodes"] > 0


def test_floor_is_max_of_overhead_and_compute():
    assert F.floor_ms(0.05, 1e6, 100.0) == pytest.approx(0.05)  # 1 MFLOP at 100 GFLOP/s = 0.01 ms
    assert F.floor_ms(0.005, 1e6, 100.0) == pytest.approx(0.01)


def test_trivial_graph_has_the_student_signature(onnx_dir, tmp_path):
    d = F.trivial_folder(onnx_dir, tmp_path / "trivial")
    sess = ort.InferenceSession(str(d / "trivial.onnx"), providers=["CPUExecutionProvider"])
    student = ort.InferenceSession(str(onnx_dir / "student.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [i.name for i in student.get_inputs()]
    assert [o.name for o in sess.get_outputs()] == [o.name for o in student.get_outputs()]
    feed = F.feed_of(random_set(n=3, L=8, C=5).batch(np.arange(3), 5))
    for a, b in zip(sess.run(None, feed), student.run(None, feed)):
        assert a.shape == b.shape and a.dtype == b.dtype and not a.any()
    oh = F.overhead(onnx_dir, [random_set(n=2, L=8).batch(np.arange(1), 1)],
                    lambda s: (lambda r: s.forward(r)), min_samples=20, min_seconds=0.0)
    assert oh["overhead_ms"] > 0 and oh["session_run_ms"] > 0 and oh["samples"] >= 20


def test_matmul_rate_and_profile(onnx_dir):
    mm = F.matmul_rate(32, 32, 32, min_samples=10, min_seconds=0.0)
    assert mm["gflops"] > 0 and mm["threads"] == 1
    feeds = [F.feed_of(random_set(n=1, L=8).batch(np.arange(1), 1))]
    prof = F.profile_ops(onnx_dir / "student.onnx", feeds, calls=10, warmup=2)
    assert prof["calls"] == 10 and prof["top_ops"] and prof["run_ms_per_call"] > 0
    ops = {o["op"] for o in prof["top_ops"]}
    assert ops & {"MatMul", "Gemm", "FusedMatMul"}
    assert all(0 <= o["share_of_call"] <= 1 for o in prof["top_ops"])


# ------------------------------------------------------------------------------------------------ report
def _pt(system, requests, workload, batch, p50, threads="all", **kw):
    st = summarize([p50 * 0.9, p50, p50 * 1.5], batch)
    st.update(p50_ms=p50, system=system, requests=requests, workload=workload, batch=batch, threads=threads,
              candidates=1 if workload == "topk" else 100, provider="x", **kw)
    return st


def _q(ndcg):
    return {"next_item": {"NDCG@10": {"value": ndcg, "ci": [ndcg - 0.01, ndcg + 0.01]},
                          "HR@10": {"value": 2 * ndcg, "ci": [ndcg, 3 * ndcg]}}}


def synthetic_report():
    T, S, O, Q = "teacher (PyTorch, LoRA merged)", "student (PyTorch)", "student (ONNX) [CPU]", "student (ONNX, INT8) [CPU]"  # noqa: E741
    systems = {
        T: dict(kind="teacher", runtime="pytorch", variant="merged", provider="torch-cpu", params=135_000_000,
                bytes=100 * 2 ** 20, quality_key="teacher", peak_rss_mb=900.0),
        S: dict(kind="student", runtime="pytorch", variant="fp32", provider="torch-cpu", params=200_000,
                bytes=800_000, quality_key="student"),
        O: dict(kind="student", runtime="onnxruntime", variant="fp32", provider="CPUExecutionProvider", params=190_000,
                bytes=700_000, quality_key=O, peak_rss_mb=60.0),
        Q: dict(kind="student", runtime="onnxruntime", variant="int8", provider="CPUExecutionProvider", params=190_000,
                bytes=300_000, quality_key=Q),
    }
    points = []
    for b, tp in ((1, 700.0), (32, 20000.0)):
        points.append(_pt(T, "natural", "topk", b, tp))
        points.append(_pt(T, "natural", "candidates", b, tp, p50_ms_all_candidates_est=tp * 100))
    points.append(_pt(T, "fixed50", "topk", 1, 900.0))
    for name, scale in ((S, 2.0), (O, 1.0), (Q, 0.5)):
        for b in (1, 32):
            points.append(_pt(name, "natural", "topk", b, 0.2 * scale * b ** 0.5))
            points.append(_pt(name, "natural", "candidates", b, 0.3 * scale * b ** 0.5))
        points.append(_pt(name, "fixed50", "topk", 1, 0.25 * scale))
        points.append(_pt(name, "fixed50", "topk", 1, 0.2 * scale, threads=1))
    add_speedups(points, systems, 100)
    q_all = {"student": _q(0.10), O: _q(0.10), Q: _q(0.0995), "popularity": _q(0.05)}
    q_sub = {"teacher": _q(0.12), **q_all}
    for s in systems.values():
        s["ndcg10_all_users"] = q_all.get(s["quality_key"], {}).get("next_item", {}).get("NDCG@10", {}).get("value")
        s["ndcg10_teacher_users"] = q_sub[s["quality_key"]]["next_item"]["NDCG@10"]["value"]
    rep = dict(
        machine=dict(platform="Linux", cpu_count=2, python="3.11", torch="2.x", onnxruntime="1.x", numpy="2.x",
                     cpu_model="Test CPU"),
        device="cpu", seed=0, threads=dict(torch_all_threads=2, ort_all_threads="default"),
        workload=dict(requests=256, history="last <= 50", mean_history=40.0, fixed_set="fixed50", fixed_requests=200,
                      fixed_history=50, candidates=100, teacher_candidates=1, top_k=10, batch_sizes=[1, 32],
                      teacher_batch_sizes=[1, 32], fixed_batch_sizes=[1], single_thread_batch_sizes=[1],
                      concurrency=[1, 2], warmup=5, min_samples=200, min_seconds=2.0, teacher_max_samples=8,
                      teacher_max_seconds=60),
        systems=systems, skipped=[dict(system="student (ONNX, FP16) [CPU]", reason="GPU only")],
        notes=["no GPU provider"], points=points,
        concurrency=[dict(system=O, threads=n, p50_ms=0.2, p90_ms=0.3, p99_ms=0.5, throughput_rps=4000.0 * n,
                          samples=500) for n in (1, 2)],
        rss={T: dict(peak_rss_mb=900.0, baseline_rss_mb=300.0, model_rss_mb=600.0, batch=8),
             O: dict(peak_rss_mb=60.0, baseline_rss_mb=45.0, model_rss_mb=15.0, batch=8),
             S: dict(error="RSS probe of student_torch failed")},
        floor=dict(matmul=dict(m=256, k=256, n=256, gflops=100.0), requests="fixed50", points=[
            dict(workload="topk", batch=1, candidates=1, flops_per_call=2e6, compute_ms=0.02, overhead_ms=0.1,
                 session_run_ms=0.01, floor_ms=0.1, bound="overhead",
                 variants={O: {"threads_1": dict(p50_ms=0.2, x_floor=2.0)}})]),
        profile={O: dict(calls=10, run_ms_per_call=0.3, kernel_ms_per_call=0.2, outside_kernels_share=0.33,
                         top_ops=[dict(op="MatMul", ms_per_call=0.1, nodes_per_call=5, share_of_call=0.33)])},
        quality_teacher_subset=dict(users=150, rows=q_sub), quality_all_users=dict(users=943, rows=q_all),
        loadtest=dict(clients=8, seconds=10, requests=5000, ok=5000, errors=0, throughput_rps=500.0, p50_ms=3.0,
                      p90_ms=5.0, p99_ms=9.0, host="127.0.0.1", path="/recommend", requests_from="test users"),
        teacher=dict(budget=dict(train_users=300, steps=100), cost={}, params=dict(total=135_000_000)),
        student=dict(params=200_000, train_seconds=100.0, best_epoch=3, stop_reason="patience", teacher_coverage=0.5),
        parity=dict(max_abs_diff={"next_item_scores": 1e-6}, passed=True),
    )
    rep["latency"] = {n: {str(p["batch"]): p for p in points if p["system"] == n and p["requests"] == "natural"
                          and p["workload"] == "topk" and p["threads"] == "all"} for n in systems}
    rep["targets"] = evaluate_targets(rep)
    return rep


def test_speedups_within_the_run():
    rep = synthetic_report()
    T = "teacher (PyTorch, LoRA merged)"
    assert rep["latency"][T]["1"]["speedup_p50_vs_teacher"] == pytest.approx(1.0)
    o = rep["latency"]["student (ONNX) [CPU]"]["1"]
    assert o["speedup_p50_vs_teacher"] == pytest.approx(700.0 / 0.2)
    cand = next(p for p in rep["points"] if p["system"] == "student (ONNX) [CPU]" and p["workload"] == "candidates"
                and p["batch"] == 1)
    assert cand["speedup_p50_vs_teacher"] == pytest.approx(700.0 * 100 / 0.3)  # teacher's 100-candidate estimate


def test_targets_say_plainly_which_are_met():
    rep = synthetic_report()
    t = {x["target"].split(":")[0]: x for x in rep["targets"]}
    assert len(rep["targets"]) == 5
    first = rep["targets"][0]
    # INT8 is within 1% of FP32 here (0.5% loss) and fastest: the targets are read on it
    assert "INT8" in first["measured"] and first["met"] is True and first["value"] == pytest.approx(900 / 0.125)
    assert rep["targets"][1]["met"] is True  # p99 = 1.5 * 0.125 ms
    assert rep["targets"][2]["met"] is True  # 0.1 ms at 1 thread vs floor 0.1 ms
    int8 = rep["targets"][3]
    assert int8["met"] is True and int8["value"] == pytest.approx(2.0)
    assert rep["targets"][4]["met"] is True and t  # 0 load-test errors
    # an INT8 that lost > 1% NDCG@10 fails its target and cannot carry the latency targets
    rep["quality_all_users"]["rows"]["student (ONNX, INT8) [CPU]"] = _q(0.09)
    again = evaluate_targets(rep)
    assert again[3]["met"] is False and "student (ONNX) [CPU]" in again[0]["measured"]
    rep["loadtest"] = dict(clients=8, seconds=10, requests=10, ok=9, errors=1)
    assert evaluate_targets(rep)[4]["met"] is False
    rep["loadtest"] = None
    assert evaluate_targets(rep)[4]["met"] is None


def test_report_writer_tables_and_plots(tmp_path):
    rep = synthetic_report()
    write_report(rep, tmp_path)
    md = (tmp_path / "report.md").read_text()
    for needle in ("## Headline", "## Targets", "**yes**", "student (ONNX, INT8) [CPU]", "teacher (PyTorch, LoRA merged)",
                   "NDCG@10", "## Floor", "MatMul", "Concurrency", "## Load test", "GPU only", "peak RSS",
                   "RSS probe of student_torch failed", "Test CPU", "onnxruntime 1.x"):
        assert needle in md, needle
    assert "| 1 | 5000 |" not in md and "| 5000 | 5000 | 0 |" in md
    for png in ("latency.png", "quality_latency.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    json.dumps(rep)  # the report is JSON-serialisable as built
    assert render_markdown(rep) == md


# ------------------------------------------------------------------------------------ ablation fold-in
def _ablation_json(data_hash="abc", student_config=None):
    agg = {"next_item": {"NDCG@10": {"value": 0.0723, "std": 0.0032, "seeds": [0.07, 0.072, 0.0759],
                                     "ci": [0.061, 0.084], "ci_value": 0.07}}}
    return dict(command="distillrec ablate runs/x", data_hash=data_hash, seeds=[0, 1, 2], n_boot=1000,
                student_config=student_config or {"epochs": 20, "kd_alpha": 0.5, "ablation_seeds": [0, 1, 2]},
                targets=[dict(target="KD student > no-KD student on next_item/NDCG@10 beyond the seed spread",
                              met=False, detail="mean KD - no-KD = +0.0002 vs seed spread 0.0042")],
                all_users=dict(users=943, rows={"student (KD, all components)": agg, "popularity": _q(0.0444)}),
                cold_start=dict(fraction=0.05, seed=0, items=84, test_events=9,
                                rows={"cold start: KD student, text vectors": agg}),
                params=dict(ratio_params=0.00213),
                training_time=dict(ablation_total_seconds=1710.0, runs_cut_by_time_budget=[]))


def test_ablation_is_folded_into_the_bench_report(tmp_path):
    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "teacher_cache").mkdir()
    cfg = {"epochs": 20, "kd_alpha": 0.5, "ablation_seeds": (0, 1, 2)}  # tuples compare equal to JSON lists
    missing = load_ablation(run, "abc", cfg)
    assert "distillrec ablate" in missing["missing"]
    rep = synthetic_report()
    rep["ablation"] = missing
    assert "Not run: `distillrec ablate" in render_markdown(rep)

    (run / "teacher_cache" / "manifest.json").write_text("{}")
    time.sleep(0.01)
    (run / "student" / "report.json").write_text(json.dumps(_ablation_json()))
    ab = load_ablation(run, "abc", cfg)
    assert ab["stale"] == [] and ab["seeds"] == [0, 1, 2] and ab["minutes"] == pytest.approx(28.5)
    rep["ablation"] = ab
    md = render_markdown(rep)
    sec = md.split("## Distillation ablation: what the teacher adds")[1].split("\n## ")[0]
    for needle in ("| KD student > no-KD student on next_item/NDCG@10 beyond the seed spread | **no** |",
                   "0.0723 ± 0.0032 [0.061, 0.084]", "All 943 test users", "Cold start (84 items", "0.213%"):
        assert needle in sec, needle
    assert "Stale" not in sec

    # other data: not shown; a changed student config or a cache rewritten afterwards: shown, marked stale
    assert "other data" in load_ablation(run, "zzz", cfg)["missing"]
    changed = load_ablation(run, "abc", dict(cfg, kd_alpha=0.7, id_dropout=0.0))  # id_dropout: a newer field
    assert changed["stale"] == ["the student config differs from the ablation's in: kd_alpha"]
    time.sleep(0.01)
    (run / "teacher_cache" / "manifest.json").write_text("{}")
    assert load_ablation(run, "abc", cfg)["stale"] == ["the teacher cache was rewritten after the ablation ran"]
    (run / "student" / "report.json").write_text("{not json")
    assert "unreadable" in load_ablation(run, "abc", cfg)["missing"]


def test_refresh_ablation_rewrites_an_existing_bench_report(tmp_path):
    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    assert refresh_ablation(run) is False  # no bench report yet: the bench folds it in when it runs
    rep = synthetic_report()
    rep["ablation"] = load_ablation(run)
    (run / "bench").mkdir()
    (run / "bench" / "report.json").write_text(json.dumps(rep))
    (run / "bench" / "report.md").write_text(render_markdown(rep))
    assert "Not run" in (run / "bench" / "report.md").read_text()
    (run / "student" / "report.json").write_text(json.dumps(_ablation_json()))
    assert refresh_ablation(run) is True
    md = (run / "bench" / "report.md").read_text()
    assert "Not run" not in md and "0.0723 ± 0.0032" in md
    assert json.loads((run / "bench" / "report.json").read_text())["ablation"]["seeds"] == [0, 1, 2]
