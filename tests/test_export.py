"""ONNX export (graph, dynamic axes, parity that can fail) and the numpy + onnxruntime serving runtime.

One tiny seeded student (40 items, dim 32, 1 layer) is exported ONCE per module; the dynamo export
takes a few seconds on 2 CPU cores.
"""
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from distill.config import StudentConfig
from export.config import ExportConfig
from distill.student import Student
from export.onnx_export import (
    INPUT_NAMES,
    ExportError,
    ServingStudent,
    check_op_set,
    check_parity,
    export_run,
    export_student,
    graph_op_types,
    parity_points,
    verify_graph,
)
from export.runtime import Recommender, RequestError, RuntimeArtifactError

REPO = Path(__file__).resolve().parents[1]
N_ITEMS, TEXT_DIM, MAX_HISTORY = 40, 16, 10
ITEM_IDS = [f"m{100 + i}" for i in range(N_ITEMS)]
POPULARITY = [int(x) for x in np.random.default_rng(3).permutation(N_ITEMS) * 7 + 1]


def build_student(tasks=("next_item", "rating", "like"), seed=0) -> Student:
    torch.manual_seed(seed)
    cfg = StudentConfig(dim=32, layers=1, heads=2, max_len=12, tower_hidden=32)
    m = Student(cfg, N_ITEMS, list(tasks), text_vectors=torch.randn(N_ITEMS, TEXT_DIM))
    with torch.no_grad():  # move every weight off its init (zeros/ones) so each one matters for parity
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def save_student(m: Student, folder: Path) -> None:
    m.save(folder, extra=dict(item_ids=ITEM_IDS, like_threshold=4.0, max_history=MAX_HISTORY,
                              item_popularity=POPULARITY, data_hash="abc123"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    m = build_student()
    save_student(m, run / "student")
    summary = export_run(run, ExportConfig(), seed=0)
    ref = Student.load(run / "student")
    ref.freeze_item_table()
    return dict(run=run, onnx=run / "onnx", summary=summary, student=ref)


@pytest.fixture(scope="module")
def rec(exported):
    return Recommender(exported["onnx"])


def torch_out(student, items, ratings, length, cand):
    with torch.no_grad():
        out = student(torch.as_tensor(items), torch.as_tensor(ratings), torch.as_tensor(length),
                      torch.as_tensor(cand))
    return {k: v.numpy() for k, v in out.items()}


def random_batch(rng, b, L, c, lengths):
    return (rng.integers(0, N_ITEMS, (b, L)).astype(np.int64), rng.integers(0, 6, (b, L)).astype(np.float32),
            np.asarray(lengths, dtype=np.int64), rng.integers(0, N_ITEMS, (b, c)).astype(np.int64))


# ------------------------------------------------------------------------------------------------ export
def test_graph_valid_with_symbolic_dims(exported):
    model = onnx.load(str(exported["onnx"] / "student.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == list(INPUT_NAMES)
    assert [o.name for o in model.graph.output] == ["next_item_scores", "rating", "like_logit"]
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        assert dims and all(d.dim_param and not d.HasField("dim_value") for d in dims), inp
    by_name = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert by_name["history_items"] == by_name["history_ratings"]
    assert len({by_name["history_items"][0], by_name["history_items"][1], by_name["candidates"][1]}) == 3
    # the item table is a constant: no id embedding / text vectors left in the graph
    names = {i.name for i in model.graph.initializer}
    assert not any("text_vectors" in n or "id_emb" in n for n in names)


def test_parity_json_and_summary(exported):
    parity = json.loads((exported["onnx"] / "parity.json").read_text())
    assert parity["passed"] is True and parity["tolerance"] == 1e-4 and parity["opset"] == 20
    assert set(parity["max_abs_diff"]) == {"next_item_scores", "rating", "like_logit"}
    assert all(v < 1e-4 for v in parity["max_abs_diff"].values())
    pts = parity["points"]
    assert {(p["batch"], p["candidates"]) for p in pts} >= {(1, 1), (2, 100), (3, 1), (5, 100)}
    assert max(p["history"] for p in pts) == MAX_HISTORY  # (5, 50) is clipped to what the model accepts
    lengths = [x for p in pts for x in p["history_length"]]
    assert 0 in lengths and any(x == p["history"] for p in pts for x in p["history_length"] if p["batch"] > 1)
    assert parity["onnxruntime_version"] == ort.__version__ and parity["torch_version"] == torch.__version__
    assert {1, 2} <= set(parity["batch_sizes"]) and {1, 2, MAX_HISTORY} <= set(parity["history_lengths"])
    s = exported["summary"]
    assert s["parity_passed"] and s["size_bytes"] == (exported["onnx"] / "student.onnx").stat().st_size > 0
    assert s["max_abs_diff"] == parity["max_abs_diff"]


def test_parity_points_cover_batch_1_2_history_50_and_max():
    pts = parity_points(60)
    by_batch = {b: {h for bb, h, _ in pts if bb == b} for b in (1, 2)}
    assert {1, 50, 60} <= by_batch[1] and {2, 50, 60} <= by_batch[2]
    assert {c for _, _, c in pts} == {1, 100}
    assert max(p[1] for p in parity_points(10)) == 10  # 50 is clipped to what the model accepts


# ------------------------------------------------------------------------------ opset 23 / Attention op
ALLOWED_OPS = {  # what the opset-20 student graph is made of: plain ai.onnx ops, attention decomposed
    "Add", "And", "Cast", "Clip", "Concat", "Div", "Equal", "Expand", "Gather", "GatherND", "Gelu", "Gemm",
    "GreaterOrEqual", "LayerNormalization", "MatMul", "Mul", "Not", "Or", "Range", "Relu", "Reshape", "Round",
    "Shape", "Slice", "Softmax", "Squeeze", "Sub", "Transpose", "Unsqueeze", "Where", "Sigmoid", "Tanh", "Max",
    "Min", "ReduceSum", "ReduceMean", "Pow", "Sqrt", "Neg", "Exp", "Less", "Greater", "LessOrEqual", "Split",
    "Constant", "ConstantOfShape", "Identity", "Erf", "IsNaN", "Abs", "Einsum",
}


def test_opset20_graph_has_no_attention_op(exported):
    model = onnx.load(str(exported["onnx"] / "student.onnx"))
    ops = graph_op_types(model)
    assert "Attention" not in ops and "Softmax" in ops and "MatMul" in ops  # attention is decomposed
    assert set(ops) <= ALLOWED_OPS, set(ops) - ALLOWED_OPS  # no contrib / fused op slipped into the export
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 20
    parity = json.loads((exported["onnx"] / "parity.json").read_text())
    assert parity["op_types"] == ops
    check_op_set(model)


class _SdpaEncoder(torch.nn.Module):
    """A student-like block written with F.scaled_dot_product_attention and a left-padding mask."""

    def __init__(self):
        super().__init__()
        self.emb, self.qkv = torch.nn.Embedding(N_ITEMS, 16), torch.nn.Linear(16, 48)

    def forward(self, items, length):
        b, L = items.shape
        q, k, v = self.qkv(self.emb(items)).view(b, L, 3, 2, 8).permute(2, 0, 3, 1, 4)
        idx = torch.arange(L).unsqueeze(0)
        allowed = ((idx.transpose(0, 1) >= idx).unsqueeze(0) & (idx >= (L - length).unsqueeze(1)).unsqueeze(1)) \
            | torch.eye(L, dtype=torch.bool)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1))[:, :, -1]


def _export_sdpa(model, opset, path):
    import warnings

    from torch.export import Dim
    ex = (torch.randint(0, N_ITEMS, (2, 5)), torch.tensor([3, 5]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, ex, dynamo=True, opset_version=opset, input_names=["items", "length"],
                                 dynamic_shapes=({0: Dim("b", min=1), 1: Dim("L", min=1)}, {0: Dim("b", min=1)}))
    prog.save(str(path))
    return onnx.load(str(path))


def test_attention_op_from_opset23_is_refused_and_opset20_is_padding_safe(tmp_path):
    """The regression guard for 'opset 23's Attention broke on onnxruntime CPU with padding masks': a model
    that uses SDPA gets the fused Attention op at opset 23 -> the export check refuses it; at opset 20 the
    same model decomposes and matches torch on padded and all-padding rows."""
    torch.manual_seed(0)
    model = _SdpaEncoder().eval()
    g23 = _export_sdpa(model, 23, tmp_path / "sdpa23.onnx")
    assert "Attention" in graph_op_types(g23)
    with pytest.raises(ExportError, match="Attention.*opset 20"):
        check_op_set(g23)
    g20 = _export_sdpa(model, 20, tmp_path / "sdpa20.onnx")
    assert "Attention" not in graph_op_types(g20)
    check_op_set(g20)
    sess = ort.InferenceSession(str(tmp_path / "sdpa20.onnx"), providers=["CPUExecutionProvider"])
    items = torch.randint(0, N_ITEMS, (4, 7))
    length = torch.tensor([0, 2, 7, 1])
    got = sess.run(None, {"items": items.numpy(), "length": length.numpy()})[0]
    with torch.no_grad():
        ref = model(items, length).numpy()
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_student_at_opset23_has_no_attention_and_keeps_parity(exported, tmp_path):
    """The student writes attention as MatMul/Softmax, so even opset 23 yields no Attention op; the padding
    parity points (empty and partial histories) still pass. The config stays at 20 (ExportConfig.opset)."""
    s = export_student(exported["run"] / "student", tmp_path / "onnx23", ExportConfig(opset=23), variants=())
    assert s["parity_passed"] and s["opset"] == 23
    parity = json.loads((tmp_path / "onnx23" / "parity.json").read_text())
    assert "Attention" not in parity["op_types"]
    assert any(0 in p["history_length"] for p in parity["points"])
    assert ExportConfig().opset == 20


def test_runtime_json(exported):
    meta = json.loads((exported["onnx"] / "runtime.json").read_text())
    assert meta["schema_version"] == 2 and meta["item_ids"] == ITEM_IDS and meta["n_items"] == N_ITEMS
    assert meta["item_popularity"] == POPULARITY and meta["data_hash"] == "abc123"
    assert meta["max_history"] == MAX_HISTORY and meta["top_k"] == 10 and meta["like_threshold"] == 4.0
    assert meta["tasks"] == ["next_item", "rating", "like"] and meta["rating_range"] == [1, 5]
    assert [i["name"] for i in meta["inputs"]] == list(INPUT_NAMES)
    assert meta["outputs"] == ["next_item_scores", "rating", "like_logit"]
    assert meta["uses_ratings"] is True


def test_export_writes_the_contract(exported):
    """Names the exporter writes are the contract's (export/contract.py), the one module the runtime reads."""
    from export import contract
    meta = json.loads((exported["onnx"] / contract.RUNTIME_META_FILE).read_text())
    assert meta["schema_version"] == contract.SCHEMA_VERSION and meta["model_file"] == contract.STUDENT_FILE
    assert [(i["name"], i["dtype"], tuple(i["shape"])) for i in meta["inputs"]] == \
        [(n, d, a) for n, (d, a) in contract.STUDENT_INPUTS.items()]
    assert meta["outputs"] == [contract.TASK_OUTPUTS[t] for t in meta["tasks"]]
    assert (exported["onnx"] / contract.PARITY_FILE).is_file()
    assert exported["summary"]["onnx"] == str(contract.serving_dir(exported["run"]) / contract.STUDENT_FILE)
    tp = meta["two_part"]
    assert tp["encoder_file"] == contract.ENCODER_FILE and tp["item_table"] == contract.ITEM_TABLE_DIR
    assert tp["encoder_inputs"] == list(contract.ENCODER_INPUT_NAMES)
    assert tp["encoder_outputs"] == [contract.ENCODER_OUTPUTS[t] for t in meta["tasks"]]
    # nothing but the student's serving files in the serving folder (no teacher, no TensorRT cache)
    assert {p.name for p in exported["onnx"].iterdir()} <= \
        {contract.STUDENT_FILE, contract.RUNTIME_META_FILE, contract.PARITY_FILE, *contract.VARIANT_FILES.values(),
         contract.ENCODER_FILE, contract.SCORER_FILE, contract.ITEM_TABLE_DIR, *contract.ENCODER_VARIANT_FILES.values()}
    code = ("import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None; sys.modules['onnxruntime'] = None\n"
            "import export.contract\nprint('OK')")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr  # the contract is stdlib only


@pytest.mark.parametrize("b,L,c,lengths", [(1, 1, 1, [1]), (1, 6, 3, [0]), (2, 5, 7, [5, 2]),
                                           (9, 10, 4, [0, 1, 2, 3, 5, 7, 9, 10, 10])])
def test_onnx_equals_torch(exported, b, L, c, lengths):
    sess = ort.InferenceSession(str(exported["onnx"] / "student.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(b * 100 + L)
    items, ratings, length, cand = random_batch(rng, b, L, c, lengths)
    got = sess.run(None, dict(zip(INPUT_NAMES, (items, ratings, length, cand))))
    ref = torch_out(exported["student"], items, ratings, length, cand)
    for name, g in zip(["next_item", "rating", "like"], got):
        assert g.shape == ref[name].shape
        np.testing.assert_allclose(g, ref[name], atol=1e-4, rtol=0)


def test_all_padding_rows_are_finite(exported, rec):
    rng = np.random.default_rng(1)
    items, ratings, length, cand = random_batch(rng, 4, 6, 5, [0, 0, 0, 0])
    out = rec.predict_arrays(items, ratings, length, cand)
    assert all(np.all(np.isfinite(v)) for v in out.values())
    # an empty history does not depend on what sits in the padding
    out2 = rec.predict_arrays(np.zeros_like(items), np.zeros_like(ratings), length, cand)
    np.testing.assert_allclose(out["next_item_scores"], out2["next_item_scores"], atol=1e-5)


def test_tampered_onnx_fails_parity(exported, tmp_path):
    model = onnx.load(str(exported["onnx"] / "student.onnx"))
    init = max((i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT),
               key=lambda i: int(np.prod(i.dims)))
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.flat[0] += 0.5
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    bad = tmp_path / "tampered.onnx"
    onnx.save(model, str(bad))
    wrapper = ServingStudent(exported["student"]).eval()
    # the untampered file passes the same check ...
    check_parity(wrapper, exported["onnx"] / "student.onnx", MAX_HISTORY, 1e-4)
    # ... the tampered one fails, naming the output and the diff
    with pytest.raises(ExportError, match=r"next_item_scores: max \|onnx - torch\| = [0-9.e+-]+ exceeds") as ei:
        check_parity(wrapper, bad, MAX_HISTORY, 1e-4)
    assert ei.value.parity["passed"] is False


def test_verify_graph_rejects_frozen_axis(exported):
    model = onnx.load(str(exported["onnx"] / "student.onnx"))
    verify_graph(model, ["next_item_scores", "rating", "like_logit"], N_ITEMS)
    model.graph.input[3].type.tensor_type.shape.dim[1].dim_value = 1  # candidates axis frozen to 1
    with pytest.raises(ExportError, match="candidates.*symbolic"):
        verify_graph(model, ["next_item_scores", "rating", "like_logit"], N_ITEMS)


def test_failed_parity_keeps_previous_model(exported, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(exported["run"], run)
    before = (run / "onnx" / "student.onnx").read_bytes()
    with pytest.raises(ExportError):  # an impossible tolerance makes the check fail after a real export
        export_student(run / "student", run / "onnx", ExportConfig(parity_tol=-1.0))
    assert (run / "onnx" / "student.onnx").read_bytes() == before
    assert json.loads((run / "onnx" / "parity.json").read_text())["passed"] is False
    assert not [p for p in (run / "onnx").iterdir() if p.name.endswith(".tmp")]


def test_next_item_only_model_exports_only_its_output(tmp_path):
    save_student(build_student(tasks=("next_item",), seed=1), tmp_path / "student")
    s = export_student(tmp_path / "student", tmp_path / "onnx", ExportConfig())
    assert s["outputs"] == ["next_item_scores"] and s["parity_passed"]
    # a model without rating/like heads was trained on data without ratings: ratings are not one of its inputs
    assert json.loads((tmp_path / "onnx" / "runtime.json").read_text())["uses_ratings"] is False
    r = Recommender(tmp_path / "onnx")
    assert r.uses_ratings is False
    with pytest.raises(RequestError, match="^ratings: this model does not use ratings"):
        r.recommend(["m101", "m102"], ratings=[5, 3])
    assert r.recommend(["m101", "m102"], ratings=[0, 0], k=3) == r.recommend(["m101", "m102"], k=3)
    assert len(r.recommend(["m101", "m102"], k=3)) == 3
    with pytest.raises(ValueError, match="no rating/like head"):
        r.score(["m101"], ["m102"])


# ------------------------------------------------------------------------------------------------ runtime
def test_recommend_matches_torch_argsort(exported, rec):
    hist = ["m105", "m117", "m103", "m130"]
    ratings = [5, 3, 4, 1]
    ids = [ITEM_IDS.index(h) for h in hist]
    ref = torch_out(exported["student"], np.array([ids]), np.array([ratings], np.float32), np.array([4]),
                    np.zeros((1, 1), np.int64))["next_item"][0]
    order = [i for i in np.argsort(-ref, kind="stable") if i not in ids][:10]
    got = rec.recommend(hist, ratings=ratings, k=10)
    assert [g[0] for g in got] == [ITEM_IDS[i] for i in order]
    np.testing.assert_allclose([g[1] for g in got], ref[order], atol=1e-4)
    assert not set(hist) & {g[0] for g in got}
    # exclude_seen=False lets seen items back; exclude masks extra ones
    everything = rec.recommend(hist, ratings=ratings, k=N_ITEMS, exclude_seen=False)
    assert len(everything) == N_ITEMS
    extra = rec.recommend(hist, ratings=ratings, k=10, exclude=[got[0][0]])
    assert got[0][0] not in {g[0] for g in extra} and extra[0][0] == got[1][0]
    assert len(rec.recommend(hist, k=100)) == N_ITEMS - len(hist)
    assert len(rec.recommend(hist)) == 10  # runtime.json top_k


def test_batch_equals_single_and_encoding(rec):
    hs = [["m101", "m102"], ["m110", "m111", "m112", "m113", "m114"], ["m139"]]
    batch = rec.recommend_batch(hs, k=5)
    for row, h in zip(batch, hs):  # padding to the batch's longest history may change the last bits only
        single = rec.recommend(h, k=5)
        assert [i for i, _ in row] == [i for i, _ in single]
        np.testing.assert_allclose([s for _, s in row], [s for _, s in single], atol=1e-5)
    assert rec._to_key(np.int64(7)) == "7" and rec._to_key(7) == "7"
    items, ratings, length = rec.encode_histories(hs)
    assert items.shape == (3, 5) and length.tolist() == [2, 5, 1] and items.dtype == np.int64
    assert items[0, :3].tolist() == [0, 0, 0] and ratings.dtype == np.float32


def test_score_matches_torch(exported, rec):
    hist, cands = ["m101", "m120", "m133"], ["m101", "m107", "m139"]
    got = rec.score(hist, cands, ratings=[4, 5, 2])
    ref = torch_out(exported["student"], np.array([[1, 20, 33]]), np.array([[4, 5, 2]], np.float32),
                    np.array([3]), np.array([[1, 7, 39]]))
    np.testing.assert_allclose(got["rating"], ref["rating"][0], atol=1e-4)
    np.testing.assert_allclose(got["like_logit"], ref["like"][0], atol=1e-4)
    np.testing.assert_allclose(got["like"], 1 / (1 + np.exp(-ref["like"][0])), atol=1e-5)
    batch = rec.score_batch([hist, ["m102"]], [cands, ["m103"]], ratings=[[4, 5, 2], None])
    np.testing.assert_allclose(batch[0]["rating"], got["rating"], atol=1e-5)
    assert batch[1]["rating"].shape == (1,)


def test_unknown_ids(exported, rec):
    with pytest.raises(ValueError, match="'nope'"):
        rec.recommend(["m101", "nope", "m102"])
    with pytest.raises(ValueError, match="'zzz'"):
        rec.score(["m101"], ["m102", "zzz"])
    drop = Recommender(exported["onnx"], unknown_items="drop")
    assert drop.recommend(["m101", "nope", "m102"], ratings=[5, 1, 3]) == rec.recommend(["m101", "m102"],
                                                                                      ratings=[5, 3])
    with pytest.raises(ValueError, match="empty history"):  # only unknown ids -> empty after dropping
        drop.recommend(["nope"])


def test_empty_history_error_vs_popularity(exported, rec):
    with pytest.raises(ValueError, match="empty_history='popularity'"):
        rec.recommend([])
    with pytest.raises(ValueError, match="empty history"):
        rec.score([], ["m101"])
    pop = Recommender(exported["onnx"], empty_history="popularity")
    top = pop.recommend([], k=5, exclude=[ITEM_IDS[int(np.argmax(POPULARITY))]])
    expected = [ITEM_IDS[i] for i in np.argsort(-np.array(POPULARITY), kind="stable")][1:6]
    assert [t[0] for t in top] == expected
    mixed = pop.recommend_batch([[], ["m101"]], k=5)
    assert mixed[0] == pop.recommend([], k=5) and mixed[1] == rec.recommend(["m101"], k=5)
    # score: an empty history is answered from popularity (no model estimate), the other rows by the model
    s = pop.score([], ["m101", "m102"])
    assert set(s) == {"popularity"} and s["popularity"].tolist() == [POPULARITY[1], POPULARITY[2]]
    both = pop.score_batch([[], ["m101"]], [["m103"], ["m102", "m103"]])
    assert set(both[0]) == {"popularity"}
    np.testing.assert_allclose(both[1]["rating"], rec.score(["m101"], ["m102", "m103"])["rating"], atol=1e-5)


def test_long_history_keeps_last_max_history(rec):
    long = [ITEM_IDS[i] for i in range(25)]
    ratings = [1 + i % 5 for i in range(25)]
    items, r, length = rec.encode_histories([long], [ratings])
    assert items.shape == (1, MAX_HISTORY) and length.tolist() == [MAX_HISTORY]
    assert items[0].tolist() == list(range(15, 25)) and r[0].tolist() == ratings[-MAX_HISTORY:]
    tail = long[-MAX_HISTORY:]
    assert rec.recommend(long, ratings, k=8, exclude_seen=False) == rec.recommend(
        tail, ratings[-MAX_HISTORY:], k=8, exclude_seen=False)
    # every item of the full history stays seen
    assert rec.recommend(long, ratings, k=8) == rec.recommend(tail, ratings[-MAX_HISTORY:], k=8, exclude=long)


@pytest.mark.parametrize("kwargs,match", [
    (dict(history="m101"), "list/sequence of item ids"),
    (dict(history=[1.5]), "item ids must be str"),
    (dict(history=["m101", "m102"], ratings=["5", "4"]), "must be numbers"),
    (dict(history=["m101", "m102"], ratings=[5.0, float("nan")]), "NaN"),
    (dict(history=["m101", "m102"], ratings=[5, float("inf")]), "NaN/inf"),
    (dict(history=["m101", "m102"], ratings=[5, 7]), r"\[1, 5\]"),
    (dict(history=["m101", "m102"], ratings=[5]), "1 ratings for 2 history items"),
    (dict(history=["m101"], k=0), "k must be a positive int"),
    (dict(history=["m101"], k=-3), "k must be a positive int"),
])
def test_input_validation(rec, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rec.recommend(**kwargs)


def test_predict_arrays_dtype_nan_and_long_history(exported, rec):
    items, ratings = np.array([[1, 2, 3]]), np.array([[5, 4, 3]], np.float32)
    with pytest.raises(ValueError, match="history_items must hold integers"):
        rec.predict_arrays(items.astype(np.float64), ratings, np.array([3]))
    with pytest.raises(ValueError, match="history_length must hold integers"):
        rec.predict_arrays(items, ratings, np.array([3.0]))
    with pytest.raises(ValueError, match="candidates must hold integers"):
        rec.predict_arrays(items, ratings, np.array([3]), np.array([["a"]]))
    with pytest.raises(ValueError, match="history_ratings must be numeric"):
        rec.predict_arrays(items, np.array([["5", "4", "3"]]), np.array([3]))
    with pytest.raises(ValueError, match="NaN"):
        rec.predict_arrays(items, np.array([[5, np.nan, 3]], np.float32), np.array([3]))
    with pytest.raises(ValueError, match="history_length must lie in"):
        rec.predict_arrays(items, ratings, np.array([4]))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        rec.predict_arrays(items[0], ratings[0], np.array([3]))
    # a history axis longer than max_history keeps the most recent max_history columns
    rng = np.random.default_rng(0)
    long_items = rng.integers(0, N_ITEMS, (2, 25)).astype(np.int64)
    long_r = rng.integers(1, 6, (2, 25)).astype(np.float32)
    out = rec.predict_arrays(long_items, long_r, np.array([25, 12]))
    tail = rec.predict_arrays(long_items[:, -MAX_HISTORY:], long_r[:, -MAX_HISTORY:], np.array([10, 10]))
    np.testing.assert_allclose(out["next_item_scores"], tail["next_item_scores"], atol=1e-6)


def test_predict_arrays_validation(rec):
    with pytest.raises(ValueError, match="outside"):
        rec.predict_arrays(np.array([[N_ITEMS]]), np.zeros((1, 1)), np.array([1]))
    with pytest.raises(ValueError, match=">= 1"):
        rec.predict_arrays(np.zeros((1, 0), np.int64), np.zeros((1, 0)), np.array([0]))


def _broken_copy(exported, tmp_path):
    dst = tmp_path / "onnx"
    shutil.copytree(exported["onnx"], dst)
    return dst


@pytest.mark.parametrize("breakage,mode", [("no_model", "single"), ("corrupt_model", "single"),
                                           ("no_encoder", "auto"), ("corrupt_encoder", "auto"), ("no_scorer", "auto"),
                                           ("no_table", "auto"), ("no_runtime", "auto"), ("corrupt_runtime", "auto"),
                                           ("old_schema", "auto")])
def test_broken_artifacts_raise_runtime_artifact_error(exported, tmp_path, breakage, mode):
    d = _broken_copy(exported, tmp_path)
    if breakage == "no_model":
        (d / "student.onnx").unlink()
    elif breakage == "corrupt_model":
        (d / "student.onnx").write_bytes(b"not a protobuf" * 10)
    elif breakage == "no_encoder":
        (d / "encoder.onnx").unlink()
    elif breakage == "corrupt_encoder":
        (d / "encoder.onnx").write_bytes(b"not a protobuf" * 10)
    elif breakage == "no_scorer":
        (d / "scorer.onnx").unlink()
    elif breakage == "no_table":
        shutil.rmtree(d / "items")
    elif breakage == "no_runtime":
        (d / "runtime.json").unlink()
    elif breakage == "corrupt_runtime":
        (d / "runtime.json").write_text('{"schema_version": 1, "item_ids": [')
    else:
        meta = json.loads((d / "runtime.json").read_text())
        (d / "runtime.json").write_text(json.dumps({**meta, "schema_version": 0}))
    with pytest.raises(RuntimeArtifactError, match=r"distillrec export <run>"):
        Recommender(d, mode=mode)


def test_runtime_works_without_torch(exported):
    code = (
        "import sys\n"
        "sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from export.runtime import Recommender\n"
        f"r = Recommender({str(exported['onnx'])!r})\n"
        "out = r.recommend(['m101', 'm102'], ratings=[5, 4], k=3)\n"
        "assert len(out) == 3 and all(isinstance(i, str) for i, _ in out)\n"
        "assert not [m for m in sys.modules if m.startswith('distill')]\n"
        "print('OK', r.providers)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "OK ['CPUExecutionProvider']" in p.stdout


def test_thread_safety(rec):
    rng = np.random.default_rng(5)
    batches = [[[ITEM_IDS[i] for i in rng.choice(N_ITEMS, size=rng.integers(1, 15), replace=False)]
                for _ in range(6)] for _ in range(8)]
    serial = [rec.recommend_batch(b, k=7) for b in batches]
    results, errors = [None] * 8, []

    def work(j):
        try:
            for _ in range(5):
                out = rec.recommend_batch(batches[j], k=7)
                assert out == serial[j]
            results[j] = out
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(j,)) for j in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == serial
