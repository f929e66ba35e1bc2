"""The lean encoder export (export/two_part.LeanUserEncoder) and the encoder variants (opt / int8 / qdq / fp16).

One seeded 2-layer student (dim 32, 300 items) is exported ONCE per module with the encoder variants.
Node counts are read from the graphs; nothing here asserts a timing.
"""
import json

import numpy as np
import onnx
import pytest
import torch

from distill.config import StudentConfig
from distill.student import Student
from export import contract as C
from export import optimize
from export import two_part as TP
from export.config import ExportConfig
from export.onnx_export import ServingStudent, export_student, reference_outputs
from export.runtime import Recommender

N_ITEMS, MAX_HISTORY = 300, 12
ITEM_IDS = [f"i{i}" for i in range(N_ITEMS)]


def _student(seed=0, layers=2) -> Student:
    torch.manual_seed(seed)
    cfg = StudentConfig(dim=32, layers=layers, heads=2, max_len=MAX_HISTORY, tower_hidden=32)
    m = Student(cfg, N_ITEMS, ["next_item", "rating", "like"], text_vectors=torch.randn(N_ITEMS, 16))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
        m.item_bias.copy_(torch.randn(N_ITEMS))
    m.eval()
    m.freeze_item_table()
    return m


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = tmp_path_factory.mktemp("encoder_opt")
    m = _student()
    m.save(run / "student", extra=dict(item_ids=ITEM_IDS, max_history=MAX_HISTORY,
                                       item_popularity=list(range(N_ITEMS))))
    cfg = ExportConfig(encoder_variants=["opt", "int8", "qdq"])
    export_student(run / "student", run / "onnx", cfg, seed=0, variants=())
    m.freeze_item_table()
    return dict(run=run, onnx=run / "onnx", student=m,
                parity=json.loads((run / "onnx" / C.PARITY_FILE).read_text()),
                meta=json.loads((run / "onnx" / C.RUNTIME_META_FILE).read_text()))


# ------------------------------------------------------------------------------------------------ lean forward
@pytest.mark.parametrize("batch,hist", [(1, 1), (1, MAX_HISTORY), (4, 7), (6, MAX_HISTORY), (3, 2)])
def test_lean_forward_equals_the_student(batch, hist):
    m = _student(seed=batch + hist)
    table = m.item_table()
    g = torch.Generator().manual_seed(hist)
    items = torch.randint(0, N_ITEMS, (batch, hist), generator=g)
    rates = torch.randint(0, 6, (batch, hist), generator=g).float()
    rates[0, 0] += 0.4  # non-integer ratings are rounded by both
    length = torch.randint(0, hist + 1, (batch,), generator=g)
    length[0] = 0  # empty history: BOS only
    if batch > 1:
        length[-1] = hist  # full history: no padding
    lean, ref = TP.LeanUserEncoder(m).eval(), TP.UserEncoder(m).eval()
    with torch.no_grad():
        want = m.encode_vectors(table[items], rates, length, last_only=True)
        got = lean.encode_last(table[items], rates, length)
        assert torch.isfinite(got).all()
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
        for a, b in zip(lean(table[items], rates, length), ref(table[items], rates, length)):
            assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert lean.output_names == ref.output_names == ["user_vector", "rating_user", "like_user"]


def test_lean_forward_one_layer_and_padding_values_ignored():
    """One block (the only block is the last_only one) and garbage in the padding slots change nothing."""
    m = _student(layers=1)
    table = m.item_table()
    items = torch.randint(0, N_ITEMS, (3, 6))
    rates = torch.randint(0, 6, (3, 6)).float()
    length = torch.tensor([0, 3, 6])
    lean = TP.LeanUserEncoder(m).eval()
    vecs = table[items]
    noisy = vecs.clone()
    noisy[1, :3] = 1e3 * torch.randn(3, vecs.shape[-1])  # padding slots of row 1
    with torch.no_grad():
        want = m.encode_vectors(vecs, rates, length, last_only=True)
        assert torch.allclose(lean.encode_last(vecs, rates, length), want, atol=1e-5, rtol=0)
        assert torch.allclose(lean.encode_last(noisy, rates, length), want, atol=1e-5, rtol=0)


def test_lean_graph_has_fewer_nodes_than_the_student_forward(exported, tmp_path):
    m = exported["student"]
    old = tmp_path / "student_forward.onnx"
    TP.export_encoder(m, old, 20, hist=5, forward="student")
    lean = onnx.load(str(exported["onnx"] / C.ENCODER_FILE))
    ref = onnx.load(str(old))
    n_lean, n_old = len(lean.graph.node), len(ref.graph.node)
    assert n_lean < n_old - 15, (n_lean, n_old)
    assert exported["parity"]["two_part"]["nodes"] == n_lean
    ops = {n.op_type for n in lean.graph.node}
    assert not ops & {"And", "Or", "Not", "Expand", "Div", "GreaterOrEqual"}  # bool mask chain / Div are gone
    assert sum(n.op_type == "Softmax" for n in lean.graph.node) == m.cfg.layers
    assert exported["parity"]["two_part"]["passed"] is True  # held to parity_tol against the PyTorch student
    with pytest.raises(ValueError, match="encoder forward must be one of"):
        TP.export_encoder(m, tmp_path / "x.onnx", 20, hist=5, forward="fast")


# ------------------------------------------------------------------------------------------------ variants
def test_encoder_variants_written_and_listed(exported):
    var = exported["parity"]["two_part"]["variants"]
    assert set(var) == {"opt", "int8", "qdq"}
    for kind, rec in var.items():
        assert rec["passed"] is True, (kind, rec["problems"])
        path = exported["onnx"] / C.ENCODER_VARIANT_FILES[kind]
        assert path.is_file() and rec["size_bytes"] == path.stat().st_size
        assert set(rec["max_abs_diff"]) == {"user_vector", "rating_user", "like_user"}
        assert rec["top10_overlap_mean"] >= 0.9 and rec["rows"] > 0
    assert max(var["opt"]["max_abs_diff"].values()) <= 1e-4 and var["opt"]["top10_overlap_mean"] == 1.0
    assert var["qdq"]["build"]["mode"] == "static" and var["qdq"]["build"]["per_channel"] is True
    assert var["qdq"]["calibration"] == "random requests"
    assert var["qdq"]["build"]["ops"].get("QuantizeLinear", 0) > 0
    assert var["int8"]["build"]["quantized_matmuls"] > 0
    listed = exported["meta"]["two_part"]["variants"]
    assert listed == {"fp32": {"file": "encoder.onnx", "precision": "fp32", "gpu_only": False},
                      "opt": {"file": "encoder.opt.onnx", "precision": "fp32", "gpu_only": False},
                      "int8": {"file": "encoder.int8.onnx", "precision": "int8", "gpu_only": False},
                      "qdq": {"file": "encoder.qdq.onnx", "precision": "int8", "gpu_only": False}}
    assert not (exported["onnx"] / C.ENCODER_VARIANT_FILES["fp16"]).exists()  # not requested


def test_encoder_variants_serve(exported):
    hist = ["i3", "i77", "i150", "i299"]
    fp32 = Recommender(exported["onnx"], mode="two_part", retrieval="exact")
    want = [i for i, _ in fp32.recommend(hist, ratings=[5, 4, 3, 2], k=10)]
    for kind in ("opt", "int8", "qdq"):
        r = Recommender(exported["onnx"], mode="two_part", variant=kind, retrieval="exact")
        assert r.model_path.name == C.ENCODER_VARIANT_FILES[kind]
        got = [i for i, _ in r.recommend(hist, ratings=[5, 4, 3, 2], k=10)]
        assert len(got) == 10
        if kind == "opt":
            assert got == want


def _refs(m):
    return reference_outputs(ServingStudent(m).eval(), MAX_HISTORY, 0)


def test_broken_quantization_is_refused_and_not_placed(exported, tmp_path, monkeypatch):
    """A quantizer that wrecks the weights: the variant fails its ranking / value check and is not written."""
    import shutil
    d = tmp_path / "onnx"
    shutil.copytree(exported["onnx"], d)
    real = optimize.quantize_int8_plain

    def broken(src, dst, per_channel=False):
        info = real(src, dst, per_channel)
        model = onnx.load(str(dst))
        for init in model.graph.initializer:
            if init.data_type == onnx.TensorProto.INT8:  # the quantized weights
                w = onnx.numpy_helper.to_array(init)
                init.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(w[..., ::-1]), init.name))
        onnx.save(model, str(dst))
        return info

    monkeypatch.setattr(optimize, "quantize_int8_plain", broken)
    m = exported["student"]
    with pytest.warns(RuntimeWarning, match="variant int8 .encoder.int8.onnx. not written"):
        var = TP.build_encoder_variants(m, d, _refs(m), ["user_vector", "rating_user", "like_user"], ("int8",),
                                        1e-4, MAX_HISTORY)
    assert var["int8"]["passed"] is False and var["int8"]["problems"]
    assert not (d / "encoder.int8.onnx").exists()  # the old file of that name was removed too
    assert not (d / "encoder.qdq.onnx").exists() and not (d / "encoder.opt.onnx").exists()  # not requested: stale
    with pytest.raises(optimize.VariantError, match="not written"):
        TP.build_encoder_variants(m, d, _refs(m), ["user_vector", "rating_user", "like_user"], ("int8",),
                                  1e-4, MAX_HISTORY, strict=True)


def test_qdq_calibration_from_histories(exported, tmp_path):
    m = exported["student"]
    table = m.item_table().numpy()
    rng = np.random.default_rng(0)
    hist = [rng.integers(0, N_ITEMS, size=n) for n in (0, 3, MAX_HISTORY + 5, 7) * 5]
    hist += [rng.integers(0, N_ITEMS, size=n) for n in rng.integers(1, MAX_HISTORY + 1, size=140)]
    rates = [rng.integers(1, 6, size=len(h)).astype(np.float32) for h in hist]
    feeds = TP.calibration_feeds(table, hist[:20], rates[:20], MAX_HISTORY, batch=8, rows=20, seed=0)
    assert [f["history_vectors"].shape[0] for f in feeds] == [8, 8, 4]
    rows = np.concatenate([f["history_length"] for f in feeds])
    assert sorted(rows.tolist()) == sorted([0, 3, MAX_HISTORY, 7] * 5)  # truncated to the last max_history
    f = feeds[0]
    for r, n in enumerate(f["history_length"]):
        assert np.all(f["history_ratings"][r, :MAX_HISTORY - n] == 0)  # LEFT-padded
        assert np.all(f["history_ratings"][r, MAX_HISTORY - n:] >= 1)
    var = TP.build_encoder_variants(m, exported["onnx"], _refs(m), ["user_vector", "rating_user", "like_user"],
                                    ("qdq",), 1e-4, MAX_HISTORY, calibration=(hist, rates))
    assert var["qdq"]["passed"] is True and var["qdq"]["calibration"] == "training histories"
    assert var["qdq"]["build"]["calibration_rows"] == 160
    with pytest.raises(optimize.VariantError, match="calibration"):
        optimize.quantize_qdq(exported["onnx"] / C.ENCODER_FILE, tmp_path / "q.onnx", [])
    with pytest.raises(optimize.VariantError, match="quant_format"):
        optimize.quantize_qdq(exported["onnx"] / C.ENCODER_FILE, tmp_path / "q.onnx", feeds, quant_format="qint4")
