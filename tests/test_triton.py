"""Triton model repository (export/triton.py): config.pbtxt parsed with Triton's own ModelConfig schema (the
model_config protobuf of the `tritonclient` wheel) and checked against the exported ONNX graph; the GPU variant;
perf_analyzer data made of real catalog items that the model accepts.

No Triton server runs here (none can be installed offline); docs/serving.md shows how to start one.
"""
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from export.runtime import Recommender
from export.triton import (TritonRepositoryError, model_config_pb2, onnx_signature, write_repository,
                           write_run_repository)

MC = model_config_pb2()
if MC is None:
    pytest.skip("tritonclient is not installed (`pip install --no-deps tritonclient`): Triton's model_config "
                "schema is needed to validate config.pbtxt", allow_module_level=True)

ONNX_TO_TRITON = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT: "TYPE_FP32"}
# conftest's tiny exported model (`serving_export`): 40 items "m100".., max_history 10, seeded popularity
N_ITEMS, MAX_HISTORY = 40, 10
ITEM_IDS = [f"m{100 + i}" for i in range(N_ITEMS)]
POPULARITY = [int(x) for x in np.random.default_rng(3).permutation(N_ITEMS) * 7 + 1]


@pytest.fixture(scope="module")
def onnx_dir(serving_export):
    assert serving_export.item_ids == ITEM_IDS and serving_export.popularity == POPULARITY
    assert serving_export.max_history == MAX_HISTORY
    return serving_export.onnx_dir


@pytest.fixture(scope="module")
def cpu_repo(onnx_dir, tmp_path_factory):
    return write_repository(onnx_dir, tmp_path_factory.mktemp("triton"))


def parse(repo, name="distillrec_student"):
    return text_format.Parse((repo / name / "config.pbtxt").read_text(), MC.ModelConfig())


def graph_io(model_path):
    g = onnx.load(str(model_path)).graph
    def one(v):
        return v.name, v.type.tensor_type.elem_type, [d.dim_value if d.HasField("dim_value") else d.dim_param
                                                     for d in v.type.tensor_type.shape.dim]
    return [one(v) for v in g.input], [one(v) for v in g.output]


def check_against_graph(entries, graph, batched=True):
    assert [e.name for e in entries] == [n for n, _, _ in graph]
    for e, (name, elem, dims) in zip(entries, graph):
        assert MC.DataType.Name(e.data_type) == ONNX_TO_TRITON[elem], name
        rest = dims[1:] if batched else dims
        want = [d if isinstance(d, int) else -1 for d in rest]
        if batched and not want:  # [batch] only -> dims [1] reshaped to [] for the model
            assert list(e.dims) == [1] and e.HasField("reshape") and list(e.reshape.shape) == [], name
        else:
            assert list(e.dims) == want and not e.HasField("reshape"), name


# ------------------------------------------------------------------------------------------------ config
def test_schema_is_tritons_and_strict():
    assert MC.ModelConfig.DESCRIPTOR.full_name == "inference.ModelConfig"
    with pytest.raises(text_format.ParseError):  # a typo'd field fails: the check below means something
        text_format.Parse('name: "x"\nmax_batch_sizes: 4\n', MC.ModelConfig())


def test_cpu_config_matches_onnx_graph(cpu_repo, onnx_dir):
    c = parse(cpu_repo)
    assert c.name == "distillrec_student" and c.platform == "onnxruntime_onnx" and c.backend == "onnxruntime"
    assert c.max_batch_size == 128 and c.default_model_filename == "model.onnx"
    inputs, outputs = graph_io(cpu_repo / "distillrec_student" / "1" / "model.onnx")
    check_against_graph(c.input, inputs)
    check_against_graph(c.output, outputs)
    by_name = {o.name: list(o.dims) for o in c.output}
    assert by_name == {"next_item_scores": [N_ITEMS], "rating": [-1], "like_logit": [-1]}
    hl = [i for i in c.input if i.name == "history_length"][0]
    assert list(hl.dims) == [1] and hl.HasField("reshape") and list(hl.reshape.shape) == []
    assert c.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert list(c.dynamic_batching.preferred_batch_size) == [8, 32]
    assert c.dynamic_batching.max_queue_delay_microseconds == 500
    assert len(c.instance_group) == 1 and c.instance_group[0].count == 1
    assert MC.ModelInstanceGroup.Kind.Name(c.instance_group[0].kind) == "KIND_CPU"
    assert not c.optimization.execution_accelerators.gpu_execution_accelerator
    # the served file is the exported model, byte for byte, with the id map beside it
    assert (cpu_repo / "distillrec_student" / "1" / "model.onnx").read_bytes() == \
        (onnx_dir / "student.onnx").read_bytes()
    assert json.loads((cpu_repo / "distillrec_student" / "runtime.json").read_text())["item_ids"] == ITEM_IDS
    assert not [p.name for p in cpu_repo.iterdir() if ".tmp" in p.name or ".old" in p.name]


def test_gpu_config_has_tensorrt_and_gpu_instances(onnx_dir, tmp_path):
    repo = write_repository(onnx_dir, tmp_path, gpu=True, instances=2, max_batch_size=64,
                            preferred_batch_sizes=(16,), max_queue_delay_us=100, warmup=True, cpu_threads=1)
    c = parse(repo)
    assert MC.ModelInstanceGroup.Kind.Name(c.instance_group[0].kind) == "KIND_GPU"
    assert c.instance_group[0].count == 2 and c.max_batch_size == 64
    assert list(c.dynamic_batching.preferred_batch_size) == [16]
    accs = c.optimization.execution_accelerators.gpu_execution_accelerator
    assert len(accs) == 1 and accs[0].name == "tensorrt"
    p = dict(accs[0].parameters)
    assert p["precision_mode"] == "FP16" and p["trt_engine_cache_enable"] == "1"
    # one TensorRT profile for every dynamic input, up to what the config admits
    for key in ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"):
        shapes = dict(s.split(":") for s in p[key].split(","))
        assert list(shapes) == ["history_items", "history_ratings", "history_length", "candidates"]
    hi = dict(s.split(":") for s in p["trt_profile_max_shapes"].split(","))
    assert hi["history_items"] == f"64x{MAX_HISTORY}" and hi["history_length"] == "64"
    assert c.parameters["intra_op_thread_count"].string_value == "1"
    # the warm-up request has the API shapes of one real request
    (w,) = c.model_warmup
    assert w.batch_size == 1
    assert {k: list(v.dims) for k, v in w.inputs.items()} == {
        "history_items": [MAX_HISTORY], "history_ratings": [MAX_HISTORY], "history_length": [1], "candidates": [1]}
    check_against_graph(c.input, graph_io(onnx_dir / "student.onnx")[0])


def test_no_batching_config(onnx_dir, tmp_path):
    c = parse(write_repository(onnx_dir, tmp_path, max_batch_size=0, warmup=True))
    assert c.max_batch_size == 0 and c.WhichOneof("scheduling_choice") is None
    inputs, outputs = graph_io(onnx_dir / "student.onnx")
    check_against_graph(c.input, inputs, batched=False)
    check_against_graph(c.output, outputs, batched=False)
    assert list(c.output[0].dims) == [-1, N_ITEMS]
    data = json.loads((tmp_path / "perf_input.json").read_text())["data"][0]
    assert data["history_items"]["shape"] == [1, MAX_HISTORY] and data["history_length"]["shape"] == [1]


def test_next_item_only_model(onnx_dir, tmp_path):
    # a dataset without ratings exports only next_item_scores: the config follows the graph
    d = tmp_path / "onnx"
    shutil.copytree(onnx_dir, d)
    model = onnx.load(str(d / "student.onnx"))
    keep = [o for o in model.graph.output if o.name == "next_item_scores"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    onnx.save(model, str(d / "student.onnx"))
    meta = json.loads((d / "runtime.json").read_text())
    (d / "runtime.json").write_text(json.dumps({**meta, "outputs": ["next_item_scores"], "tasks": ["next_item"]}))
    c = parse(write_repository(d, tmp_path / "repo"))
    assert [o.name for o in c.output] == ["next_item_scores"] and list(c.output[0].dims) == [N_ITEMS]
    assert [i.name for i in c.input] == ["history_items", "history_ratings", "history_length", "candidates"]


def test_signature_without_onnx_package_matches(onnx_dir, monkeypatch):
    import importlib.util
    with_onnx = onnx_signature(onnx_dir / "student.onnx")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    assert onnx_signature(onnx_dir / "student.onnx") == with_onnx  # read through onnxruntime instead


def test_rewrite_replaces_the_model_folder(onnx_dir, tmp_path):
    write_repository(onnx_dir, tmp_path, max_batch_size=16, preferred_batch_sizes=(4,))
    (tmp_path / "distillrec_student" / "stale.txt").write_text("from the previous version")
    write_repository(onnx_dir, tmp_path, model_name="distillrec_student")
    assert not (tmp_path / "distillrec_student" / "stale.txt").exists()
    assert parse(tmp_path).max_batch_size == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["distillrec_student", "perf_input.json",
                                                          "perf_input_ids.json"]


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(preferred_batch_sizes=(8, 256)), ValueError, "preferred_batch_sizes"),
    (dict(max_batch_size=-1), ValueError, "max_batch_size"),
    (dict(instances=0), ValueError, "instances"),
    (dict(trt_precision="FP8"), ValueError, "trt_precision"),
    (dict(model_name="a/b"), ValueError, "model_name"),
    (dict(model_file="student.missing.onnx"), TritonRepositoryError, "student.missing.onnx is missing"),
])
def test_bad_options(onnx_dir, tmp_path, kwargs, err, match):
    with pytest.raises(err, match=match):
        write_repository(onnx_dir, tmp_path, **kwargs)


def test_inconsistent_or_missing_artifacts(onnx_dir, tmp_path):
    with pytest.raises(TritonRepositoryError, match="runtime.json is missing"):
        write_repository(tmp_path / "nothing", tmp_path / "repo")
    d = tmp_path / "onnx"
    shutil.copytree(onnx_dir, d)
    meta = json.loads((d / "runtime.json").read_text())
    (d / "runtime.json").write_text(json.dumps({**meta, "outputs": ["next_item_scores", "rating"]}))
    with pytest.raises(TritonRepositoryError, match="runtime.json expects"):
        write_repository(d, tmp_path / "repo")


def test_write_run_repository(onnx_dir, tmp_path):
    from distillrec.config import PipelineConfig as RunConfig
    run = tmp_path / "run"
    shutil.copytree(onnx_dir, run / "onnx")
    cfg = RunConfig()
    assert write_run_repository(run, cfg) == run / "triton"
    assert MC.ModelInstanceGroup.Kind.Name(parse(run / "triton").instance_group[0].kind) == "KIND_CPU"
    cfg.export.providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    write_run_repository(run, cfg, instances=3)
    c = parse(run / "triton")
    assert MC.ModelInstanceGroup.Kind.Name(c.instance_group[0].kind) == "KIND_GPU" and c.instance_group[0].count == 3
    with pytest.raises(TritonRepositoryError, match="distillrec export"):
        write_run_repository(tmp_path / "empty-run")


# ------------------------------------------------------------------------------------------------ perf data
def test_perf_input_uses_real_ids_and_model_shapes(cpu_repo, onnx_dir):
    data = json.loads((cpu_repo / "perf_input.json").read_text())["data"]
    readable = json.loads((cpu_repo / "perf_input_ids.json").read_text())["requests"]
    assert len(data) == len(readable) >= 4
    c = parse(cpu_repo)
    api_dims = {i.name: list(i.dims) for i in c.input}
    popular = [ITEM_IDS[i] for i in np.argsort(-np.array(POPULARITY), kind="stable")]
    assert readable[0]["history"] == popular[:MAX_HISTORY]  # the most popular items, a full history
    for entry, r in zip(data, readable):
        assert list(entry) == [i.name for i in c.input]
        for name, t in entry.items():
            assert len(t["content"]) == int(np.prod(t["shape"]))
            assert len(t["shape"]) == len(api_dims[name])
            assert all(d == -1 or d == s for d, s in zip(api_dims[name], t["shape"]))
        assert entry["history_items"]["shape"] == [MAX_HISTORY]  # padded to max_history: batchable together
        n = entry["history_length"]["content"][0]
        assert n == r["history_length"] == len(r["history"]) and 1 <= n <= MAX_HISTORY
        items = entry["history_items"]["content"]
        assert items[:MAX_HISTORY - n] == [0] * (MAX_HISTORY - n)
        # indices are positions in runtime.json item_ids, and the ids are real catalog ids
        assert [ITEM_IDS[i] for i in items[MAX_HISTORY - n:]] == r["history"]
        assert [ITEM_IDS[i] for i in entry["candidates"]["content"]] == r["candidates"]
        assert set(r["history"]) | set(r["candidates"]) <= set(ITEM_IDS)


def test_perf_input_runs_on_the_model_as_one_batch(cpu_repo, onnx_dir):
    # what Triton's dynamic batcher does with these requests: stack them along the batch axis, run once
    data = json.loads((cpu_repo / "perf_input.json").read_text())["data"]
    readable = json.loads((cpu_repo / "perf_input_ids.json").read_text())["requests"]
    sess = ort.InferenceSession(str(cpu_repo / "distillrec_student" / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    dtypes = {"history_items": np.int64, "history_ratings": np.float32, "history_length": np.int64,
              "candidates": np.int64}
    feed = {n: np.stack([np.asarray(e[n]["content"], dt).reshape(e[n]["shape"]) for e in data]) for n, dt in
            dtypes.items()}
    feed["history_length"] = feed["history_length"].reshape(-1)  # the config's reshape: [B, 1] -> [B]
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    assert out["next_item_scores"].shape == (len(data), N_ITEMS)
    assert all(np.all(np.isfinite(v)) for v in out.values())
    # same answers as the runtime on the raw ids (padding to max_history changes the last bits at most)
    rec = Recommender(onnx_dir)
    for row, r in enumerate(readable):
        want = rec.score(r["history"], r["candidates"], ratings=r["ratings"])
        np.testing.assert_allclose(out["rating"][row], want["rating"], atol=1e-5)
        np.testing.assert_allclose(out["like_logit"][row], want["like_logit"], atol=1e-5)
