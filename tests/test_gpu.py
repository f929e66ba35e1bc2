"""GPU checks, opt in: `python -m pytest -m gpu` on a machine with onnxruntime-gpu and a working CUDA device.

A tiny student is exported (FP32 + FP16); the serving runtime must really run it on CUDA (strict providers: a
silent fallback to the CPU fails), with outputs matching FP32 on the CPU provider; TensorRT, where its libraries
are installed, serves too and keeps its engine cache outside the (possibly read-only) model folder;
export/gpu_check.py's report on the same folder records no failed check; the PyTorch student computes the same
outputs on CUDA as on the CPU. Every test skips where its device or provider is missing.
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

CUDA, TRT, CPU = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"
HAS_CUDA_EP = CUDA in ort.get_available_providers()
# onnxruntime-gpu lists TensorRT even without its libraries; the `tensorrt` wheel is what brings them
HAS_TRT = TRT in ort.get_available_providers() and importlib.util.find_spec("tensorrt") is not None

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HAS_CUDA_EP, reason="needs onnxruntime-gpu (CUDAExecutionProvider) and a GPU")]

# Largest |GPU - CPU FP32| / max|CPU FP32| per output. FP32 on CUDA may use TF32 matmuls (~1e-3); FP16 and
# TensorRT (which the runtime runs in FP16) get the export's FP16 parity tolerance. A wrong input or output
# mapping is off by O(1).
REL_TOL = {"fp32": 5e-3, "fp16": 1e-2, "tensorrt": 1e-2}
MIN_TOP10_OVERLAP = 0.9


@pytest.fixture(scope="module", autouse=True)
def _cuda_libraries():
    """CUDA / cuDNN from the nvidia-* wheels, when that is how they came (onnxruntime >= 1.21)."""
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


@pytest.fixture(scope="module")
def exported(export_serving_student):
    pytest.importorskip("torch")
    return export_serving_student(variants=("fp16",))


def requests(n_items: int, max_history: int, seed: int = 0) -> list[tuple]:
    """Left-padded (items, ratings, length, candidates) batches of 1, 8 and 32 rows; row 1 is an empty history."""
    rng = np.random.default_rng(seed)
    out = []
    for b, c in ((1, 1), (8, 20), (32, 40)):
        length = rng.integers(1, max_history + 1, size=b)
        length[0] = max_history
        if b > 1:
            length[1] = 0
        items = rng.integers(0, n_items, (b, max_history)).astype(np.int64)
        ratings = rng.integers(1, 6, (b, max_history)).astype(np.float32)
        for row, n in enumerate(length):
            items[row, : max_history - n], ratings[row, : max_history - n] = 0, 0.0
        out.append((items, ratings, length.astype(np.int64), rng.integers(0, n_items, (b, c)).astype(np.int64)))
    return out


def top10_overlap(a: np.ndarray, b: np.ndarray) -> float:
    ta, tb = np.argsort(-a, axis=1)[:, :10], np.argsort(-b, axis=1)[:, :10]
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(ta.tolist(), tb.tolist())]))


def assert_matches_cpu(rec, folder, tol: float) -> None:
    from export.runtime import Recommender
    cpu = Recommender(folder, providers=["cpu"], variant="fp32")
    for batch in requests(rec.n_items, rec.max_history):
        ref, got = cpu.predict_arrays(*batch), rec.predict_arrays(*batch)
        assert set(got) == set(ref)
        for name, values in got.items():
            assert values.shape == ref[name].shape and np.isfinite(values).all(), name
            scale = max(1.0, float(np.abs(ref[name]).max()))
            assert float(np.abs(values.astype(np.float64) - ref[name]).max()) <= tol * scale, name
        assert top10_overlap(ref["next_item_scores"], got["next_item_scores"]) >= MIN_TOP10_OVERLAP


@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_cuda_serves_and_matches_cpu_fp32(exported, variant):
    from export.runtime import Recommender
    rec = Recommender(exported.onnx_dir, providers=["cuda"], variant=variant, strict_providers=True)
    assert rec.providers[0] == CUDA
    assert rec.provider_record.get("fallback_warning") is None
    assert_matches_cpu(rec, exported.onnx_dir, REL_TOL[variant])


def test_recommend_on_cuda_returns_the_cpu_top10(exported):
    """The high-level API (raw ids in, ranked raw ids out) on CUDA: the same items as on the CPU."""
    from export.runtime import Recommender
    gpu = Recommender(exported.onnx_dir, providers=["cuda"], strict_providers=True)
    cpu = Recommender(exported.onnx_dir, providers=["cpu"])
    histories = [exported.item_ids[i: i + 5] for i in range(0, 30, 5)]
    ratings = [[4.0, 3.0, 5.0, 1.0, 4.0]] * len(histories)
    for g, c in zip(gpu.recommend_batch(histories, ratings, k=10), cpu.recommend_batch(histories, ratings, k=10)):
        g_ids, c_ids = [item for item, _ in g], [item for item, _ in c]
        assert len(g_ids) == len(c_ids) == 10
        assert len(set(g_ids) & set(c_ids)) >= 9


def test_fp16_refused_on_cpu_provider(exported):
    from export.runtime import Recommender, UnsupportedProviderError
    with pytest.raises(UnsupportedProviderError, match="GPU-only"):
        Recommender(exported.onnx_dir, providers=["cpu"], variant="fp16")


@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT libraries (pip install tensorrt) for onnxruntime-gpu")
def test_tensorrt_serves_with_its_cache_outside_the_model_folder(exported, tmp_path):
    from export.runtime import Recommender
    rec = Recommender(exported.onnx_dir, providers=["tensorrt"], strict_providers=True, trt_cache_root=tmp_path)
    assert rec.providers[0] == TRT
    assert_matches_cpu(rec, exported.onnx_dir, REL_TOL["tensorrt"])  # the first calls build the engine
    assert rec.trt_cache is not None and tmp_path in rec.trt_cache.parents
    assert exported.onnx_dir not in rec.trt_cache.parents
    assert any(rec.trt_cache.iterdir()), "TensorRT wrote no engine / timing cache"


def test_gpu_check_report_has_no_failed_check(exported, tmp_path):
    import json

    from export import gpu_check
    out, trt_root = tmp_path / "gpu_check.json", tmp_path / "trt"
    assert gpu_check.main([str(exported.onnx_dir), "--out", str(out), "--budget-s", "600",
                           "--trt-cache-root", str(trt_root)]) == 0
    report = json.loads(out.read_text())
    assert CUDA in report["env"]["available_providers"]
    checks = [c for c in report["checks"] if "skipped" not in c]
    assert {c["variant"] for c in checks} >= {"fp32", "fp16"}
    for c in checks:
        if c["requested"] == ["tensorrt", "cuda", "cpu"] and not HAS_TRT:
            continue  # TensorRT listed but without its libraries: the check records the fallback
        assert c["ok"], c
        if c["requested"][0] == "cuda":
            assert c["serves"] == CUDA, c
        if c["requested"][0] == "tensorrt":
            assert c["serves"] == TRT, c
            assert trt_root in Path(c["trt_cache"]).parents, c  # never inside the model folder
        if c["requested"] != ["cpu"]:
            assert c["top10_overlap_vs_cpu_fp32"] >= MIN_TOP10_OVERLAP, c


def test_torch_student_on_cuda_equals_cpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device")
    from distill.config import StudentConfig
    from distill.student import Student
    torch.manual_seed(0)
    m = Student(StudentConfig(dim=32, layers=2, heads=2, max_len=12, tower_hidden=32), 50,
                ["next_item", "rating", "like"], text_vectors=torch.randn(50, 16)).eval()
    items, ratings, length, cand = (torch.as_tensor(a) for a in requests(50, 12)[-1])
    with torch.no_grad():
        cpu = m(items, ratings, length, cand)
        gpu = m.to("cuda")(items.cuda(), ratings.cuda(), length.cuda(), cand.cuda())
    for name, values in cpu.items():
        torch.testing.assert_close(gpu[name].cpu(), values, atol=1e-4, rtol=1e-4)
