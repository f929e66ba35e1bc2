"""Teacher export: the tiny random Llama teacher (configs/tiny.yaml) trained for 2 steps, LoRA merged, heads
included, exported with torch.onnx (dynamo, opset 20) and compared with teacher_predict."""
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from distill.config import load_config
from export import contract
from export.teacher_export import INPUT_NAMES, TeacherExportError, export_teacher

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from distill.teacher_stage import train_teacher
    out = tmp_path_factory.mktemp("teacher_export")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"out_dir={out}", "name=t", "teacher.max_steps=2",
                                                       "teacher.eval_users=8"])
    train_teacher(cfg)
    # what an older export left: the teacher inside the serving folder, next to the student
    legacy = contract.serving_dir(cfg.run_dir)
    legacy.mkdir(parents=True, exist_ok=True)
    for name in (contract.TEACHER_ONNX_FILE, contract.TEACHER_PARITY_FILE, contract.STUDENT_FILE):
        (legacy / name).write_text("old")
    summary = export_teacher(cfg.run_dir, opset=20, seed=0)
    return dict(cfg=cfg, dir=Path(cfg.run_dir), summary=summary)


def test_teacher_is_written_outside_the_serving_folder(run):
    path = contract.teacher_onnx_path(run["dir"])
    assert path == run["dir"] / "teacher_onnx" / "teacher.onnx" and path.is_file()
    assert run["summary"]["onnx"] == str(path)
    assert run["summary"]["parity"] == str(contract.teacher_onnx_dir(run["dir"]) / contract.TEACHER_PARITY_FILE)
    onnx_dir = contract.serving_dir(run["dir"])  # the older export's teacher is gone, the student untouched
    assert not (onnx_dir / "teacher.onnx").exists() and not (onnx_dir / "teacher_parity.json").exists()
    assert (onnx_dir / contract.STUDENT_FILE).read_text() == "old"


def test_graph_signature(run):
    path = contract.teacher_onnx_path(run["dir"])
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    ins = {i.name: i.type.tensor_type for i in m.graph.input}
    assert list(ins) == list(INPUT_NAMES)
    assert all(t.elem_type == onnx.TensorProto.INT64 for t in ins.values())
    dims = {n: [d.dim_param for d in t.shape.dim] for n, t in ins.items()}
    assert dims["input_ids"] == dims["attention_mask"] and all(dims["input_ids"]) and len(dims["input_ids"]) == 2
    assert dims["before_pos"] == dims["item_pos"] == [dims["input_ids"][0]]
    assert [o.name for o in m.graph.output] == ["next_item_scores", "rating", "like_logit"]
    ops = {n.op_type for n in m.graph.node}
    assert "Attention" not in ops and max(o.version for o in m.opset_import if o.domain == "") == 20
    assert not any("lora" in i.name.lower() for i in m.graph.initializer)  # merged, no adapter branches


def test_parity_record(run):
    rec = json.loads((contract.teacher_onnx_dir(run["dir"]) / "teacher_parity.json").read_text())
    assert rec["passed"] is True and rec["tolerance"] == 1e-3 and rec["lora_merged"] is True
    assert rec["exporter"] == "torch.onnx.export(dynamo=True)" and rec["opset"] == 20
    assert all(v <= 1e-3 for v in rec["max_abs_diff"].values())
    assert {p["batch"] for p in rec["points"]} == {1, 2, 3}
    assert any(min(p["lengths"]) < p["tokens"] for p in rec["points"])  # padded rows were checked
    assert rec["size_bytes"] == contract.teacher_onnx_path(run["dir"]).stat().st_size
    assert run["summary"]["parity_passed"] is True


def test_onnx_matches_teacher_predict_on_protocol_users(run):
    """Same token ids / positions as distill.teacher_stage.teacher_predict; the reference is the UNMERGED
    PyTorch teacher (base + LoRA adapter), so this also checks merge_and_unload."""
    from distill.data import Split, load_dataset, sample_users
    from distill.teacher import SequenceBuilder, load_teacher, pad_batch
    from distill.teacher_stage import teacher_predict
    cfg = run["cfg"]
    ds = load_dataset(cfg.data)
    split = Split.leave_last_out(ds)
    teacher, tok, _ = load_teacher(run["dir"] / "teacher", merge=False)
    builder = SequenceBuilder(tok, ds.item_text, cfg.teacher.max_item_tokens, ds.has_ratings)
    users = sample_users(split.eval_users, 6, 1)
    groups = [(users[:3], 12), (users[3:], 4)]  # two history lengths in one batch: padding is exercised
    refs = [teacher_predict(teacher, builder, split, us, "test", h, 10 ** 6, "cpu") for us, h in groups]
    ref = {k: np.concatenate([r[k] for r in refs]) for k in ("scores", "rating", "like_logit")}
    encs = []
    for us, h in groups:
        for u in us:
            h_items, h_ratings = split.history(u, "test", h)
            tgt, _ = split.target(u, "test")
            encs.append(builder.encode(np.append(h_items, tgt), np.append(h_ratings, 0.0), open_last=True))
    ids, mask = pad_batch([e.ids for e in encs], builder.pad_id)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
            "before_pos": np.array([e.before[-1] for e in encs]), "item_pos": np.array([e.item_end[-1] for e in encs])}
    assert mask.numpy().min() == 0
    sess = ort.InferenceSession(str(contract.teacher_onnx_path(run["dir"])), providers=["CPUExecutionProvider"])
    scores, rating, like = sess.run(None, feed)
    np.testing.assert_allclose(scores, ref["scores"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(rating, ref["rating"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(like, ref["like_logit"], atol=1e-3, rtol=0)
    # the adapter is not a no-op: merged weights differ from the base model's
    base = teacher.backbone.get_base_model() if hasattr(teacher.backbone, "get_base_model") else None
    assert base is not None and any("lora_B" in n and p.abs().sum() > 0 for n, p in teacher.backbone.named_parameters())


def test_failed_parity_keeps_previous_teacher_onnx(run, tmp_path):
    import shutil
    out = tmp_path / "teacher_onnx"
    shutil.copytree(contract.teacher_onnx_dir(run["dir"]), out)
    before = (out / "teacher.onnx").read_bytes()
    with pytest.raises(TeacherExportError, match="exceeds -1"):
        export_teacher(run["dir"], tol=-1.0, out_dir=out)
    assert (out / "teacher.onnx").read_bytes() == before
    assert json.loads((out / "teacher_parity.json").read_text())["passed"] is False
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
