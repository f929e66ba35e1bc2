"""Single-graph serving variants (export/optimize.py): ORT-optimized, INT8 (catalog MatMul excluded), FP16 (GPU only).

These are student.*.onnx, served with mode="single" (the encoder's variants: tests/test_encoder_opt.py).

One seeded student with a 300-item catalog is exported ONCE per module with every variant (~5 s).
"""
import json
import shutil
import warnings

import numpy as np
import onnx
import pytest
import torch

from distill.config import StudentConfig
from export.config import ExportConfig
from distill.student import Student
from export import optimize
from export.onnx_export import ServingStudent, export_student, reference_outputs
from export.optimize import VARIANT_FILES, VariantError, build_variants, find_catalog_matmul, quantize_int8
from export.runtime import Recommender, RuntimeArtifactError, UnsupportedProviderError

N_ITEMS, MAX_HISTORY = 300, 12
ITEM_IDS = [f"i{i}" for i in range(N_ITEMS)]


def _student(seed=0) -> Student:
    torch.manual_seed(seed)
    cfg = StudentConfig(dim=32, layers=1, heads=2, max_len=MAX_HISTORY, tower_hidden=32)
    m = Student(cfg, N_ITEMS, ["next_item", "rating", "like"], text_vectors=torch.randn(N_ITEMS, 16))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
        m.item_bias.copy_(torch.randn(N_ITEMS))  # a spread of scores like a trained model's popularity prior
    return m.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = tmp_path_factory.mktemp("variants")
    m = _student()
    m.save(run / "student", extra=dict(item_ids=ITEM_IDS, max_history=MAX_HISTORY,
                                       item_popularity=list(range(N_ITEMS))))
    summary = export_student(run / "student", run / "onnx", ExportConfig(), seed=0)
    m.freeze_item_table()
    return dict(run=run, onnx=run / "onnx", summary=summary, student=m,
                parity=json.loads((run / "onnx" / "parity.json").read_text()),
                meta=json.loads((run / "onnx" / "runtime.json").read_text()))


def _first_matmul(model):
    return optimize._first_matmul_back_from(model, "next_item_scores")


def test_every_variant_written_with_its_parity(exported):
    var = exported["parity"]["variants"]
    assert set(var) == {"opt", "int8", "fp16"}
    for kind, rec in var.items():
        path = exported["onnx"] / VARIANT_FILES[kind]
        assert rec["passed"] is True, (kind, rec["problems"])
        assert path.is_file() and rec["size_bytes"] == path.stat().st_size > 0
        assert rec["tolerance"] and rec["top10_overlap_mean"] is not None and rec["rows"] > 0
        assert set(rec["max_abs_diff"]) == {"next_item_scores", "rating", "like_logit"}
        assert len(rec["points"]) == len(exported["parity"]["points"])  # the same inputs as the FP32 check
    assert var["opt"]["tolerance"]["max_abs_diff"] == 1e-4
    assert var["int8"]["tolerance"] == {"top10_overlap_min": 0.9, "max_rel_diff": 0.1}
    assert var["fp16"]["tolerance"] == {"top10_overlap_min": 0.9, "max_rel_diff": 1e-2}
    listed = exported["meta"]["variants"]
    assert listed == {"fp32": {"file": "student.onnx", "precision": "fp32", "gpu_only": False},
                      "opt": {"file": "student.opt.onnx", "precision": "fp32", "gpu_only": False},
                      "int8": {"file": "student.int8.onnx", "precision": "int8", "gpu_only": False},
                      "fp16": {"file": "student.fp16.onnx", "precision": "fp16", "gpu_only": True}}
    assert exported["summary"]["variants"]["int8"]["passed"] is True


def test_opt_variant_is_fused_and_exact(exported):
    rec = exported["parity"]["variants"]["opt"]
    assert rec["build"]["level"] == "ORT_ENABLE_EXTENDED"
    assert any(k.startswith("com.microsoft.") for k in rec["build"]["ops"])  # fused kernels were saved
    assert max(rec["max_abs_diff"].values()) <= 1e-4 and rec["top10_overlap_mean"] == 1.0
    fp32, opt = Recommender(exported["onnx"], mode="single"), Recommender(exported["onnx"], mode="single", variant="opt")
    assert opt.model_path.name == "student.opt.onnx" and opt.precision == "fp32"
    hist = ["i3", "i77", "i150", "i299"]
    assert [i for i, _ in opt.recommend(hist, k=10)] == [i for i, _ in fp32.recommend(hist, k=10)]


def test_int8_excludes_the_catalog_matmul_by_default(exported, tmp_path):
    fp32 = onnx.load(str(exported["onnx"] / "student.onnx"))
    node = find_catalog_matmul(fp32, n_items=N_ITEMS)
    assert node is not None and node.op_type == "MatMul"
    rec = exported["parity"]["variants"]["int8"]
    assert rec["build"]["catalog_matmul_quantized"] is False and rec["build"]["nodes_to_exclude"]
    assert rec["build"]["quantized_matmuls"] > 0  # the encoder / towers are quantized
    int8 = onnx.load(str(exported["onnx"] / "student.int8.onnx"))
    assert _first_matmul(int8).op_type == "MatMul"  # scores still come from an FP32 MatMul
    assert rec["top10_overlap_mean"] >= 0.9
    # the flag quantizes it too
    info = quantize_int8(exported["onnx"] / "student.onnx", tmp_path / "all.onnx", include_catalog_matmul=True,
                         n_items=N_ITEMS)
    assert info["catalog_matmul_quantized"] is True and info["nodes_to_exclude"] == []
    assert _first_matmul(onnx.load(str(tmp_path / "all.onnx"))).op_type == "MatMulInteger"
    assert info["quantized_matmuls"] == rec["build"]["quantized_matmuls"] + 1
    r = Recommender(exported["onnx"], mode="single", variant="int8")
    assert len(r.recommend(["i1", "i2"], k=10)) == 10 and r.precision == "int8"


def test_fp16_has_fp32_io_and_is_refused_on_cpu(exported, tmp_path):
    rec = exported["parity"]["variants"]["fp16"]
    assert rec["gpu_only"] is True and "reference only" in rec["measured_on"]
    assert all(r <= 1e-2 for r in rec["max_rel_diff"].values())
    m = onnx.load(str(exported["onnx"] / "student.fp16.onnx"))
    io = [v.type.tensor_type.elem_type for v in list(m.graph.input) + list(m.graph.output)]
    assert onnx.TensorProto.FLOAT16 not in io
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer)
    for kwargs in (dict(variant="fp16"), dict(model_file="student.fp16.onnx"),
                   dict(variant="fp16", providers=["cuda", "cpu"])):
        with pytest.raises(UnsupportedProviderError, match="FP16 variant, which is GPU-only") as ei:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                Recommender(exported["onnx"], mode="single", **kwargs)
        assert "CPUExecutionProvider" in str(ei.value) and "student.int8.onnx" in str(ei.value)
    # a copy under another name (not listed in runtime.json) is recognised by its metadata
    shutil.copy(exported["onnx"] / "student.fp16.onnx", exported["onnx"] / "renamed.onnx")
    try:
        with pytest.raises(UnsupportedProviderError, match="GPU-only"):
            Recommender(exported["onnx"], model_file="renamed.onnx")
    finally:
        (exported["onnx"] / "renamed.onnx").unlink()


def test_unknown_variant_is_a_clear_error(exported):
    with pytest.raises(RuntimeArtifactError, match="variant 'bf16' is not in"):
        Recommender(exported["onnx"], variant="bf16")
    with pytest.raises(ValueError, match="either model_file or variant"):
        Recommender(exported["onnx"], variant="int8", model_file="student.onnx")


def test_missing_or_corrupt_variant_file_is_a_clear_error(exported, tmp_path):
    d = tmp_path / "onnx"
    shutil.copytree(exported["onnx"], d)
    (d / "student.int8.onnx").unlink()
    with pytest.raises(RuntimeArtifactError, match="student.int8.onnx is missing"):
        Recommender(d, mode="single", variant="int8")
    (d / "student.opt.onnx").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(RuntimeArtifactError, match="cannot be loaded"):
        Recommender(d, mode="single", variant="opt")


def test_variants_load_without_torch(exported):
    import os
    import subprocess
    import sys
    from pathlib import Path
    code = (
        "import sys\n"
        "sys.modules['torch'] = None; sys.modules['onnx'] = None\n"
        "from export.runtime import Recommender, UnsupportedProviderError\n"
        f"d = {str(exported['onnx'])!r}\n"
        "for v in ('fp32', 'opt', 'int8'):\n"
        "    assert len(Recommender(d, mode='single', variant=v).recommend(['i1', 'i2'], k=5)) == 5\n"
        "try:\n"
        "    Recommender(d, mode='single', variant='fp16')\n"
        "except UnsupportedProviderError:\n"
        "    print('OK')\n"
    )
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr


def test_failing_variant_is_not_placed(exported, tmp_path, monkeypatch):
    onnx_dir = tmp_path / "onnx"
    shutil.copytree(exported["onnx"], onnx_dir)
    wrapper = ServingStudent(exported["student"]).eval()
    refs = reference_outputs(wrapper, MAX_HISTORY, seed=0)
    monkeypatch.setitem(optimize.VARIANT_TOLERANCES, "int8", {"top10_overlap_min": 1.01, "max_rel_diff": 0.1})
    with pytest.warns(RuntimeWarning, match="variant int8 .* not written"):
        recs = build_variants(onnx_dir / "student.onnx", onnx_dir, refs, wrapper.output_names,
                              variants=("int8",), n_items=N_ITEMS)
    assert recs["int8"]["passed"] is False and "top-10 overlap" in recs["int8"]["problems"][0]
    assert not (onnx_dir / "student.int8.onnx").exists()
    # variants not requested are removed (they were built from an older student.onnx)
    assert not (onnx_dir / "student.opt.onnx").exists() and not (onnx_dir / "student.fp16.onnx").exists()
    assert not [p for p in onnx_dir.iterdir() if p.name.endswith(".tmp") or ".pre." in p.name]
    with pytest.raises(VariantError, match="top-10 overlap"):
        build_variants(onnx_dir / "student.onnx", onnx_dir, refs, wrapper.output_names, variants=("int8",),
                       n_items=N_ITEMS, strict=True)
    with pytest.raises(VariantError, match="unknown variant"):
        build_variants(onnx_dir / "student.onnx", onnx_dir, refs, wrapper.output_names, variants=("int4",))


def test_export_with_a_subset_of_variants(exported, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(exported["run"], run)
    s = export_student(run / "student", run / "onnx", ExportConfig(), variants=("opt",))
    assert set(s["variants"]) == {"opt"}
    meta = json.loads((run / "onnx" / "runtime.json").read_text())
    assert set(meta["variants"]) == {"fp32", "opt"}
    assert sorted(p.name for p in (run / "onnx").glob("student*.onnx")) == ["student.onnx", "student.opt.onnx"]
    # the encoder's variants follow ExportConfig.encoder_variants, not the single graph's list
    assert set(meta["two_part"]["variants"]) == {"fp32", "opt", "int8", "qdq", "fp16"}
    with pytest.raises(RuntimeArtifactError, match="variant 'int8' is not in"):
        Recommender(run / "onnx", mode="single", variant="int8")


def test_top_k_overlap():
    ref = np.array([[5.0, 4, 3, 2, 1], [1, 2, 3, 4, 5]])
    got = np.array([[5.0, 4, 1, 2, 3], [5, 4, 3, 2, 1]])
    np.testing.assert_allclose(optimize.top_k_overlap(ref, got, k=2), [1.0, 0.0])
    np.testing.assert_allclose(optimize.top_k_overlap(ref, got, k=3), [2 / 3, 1 / 3])
