"""Triton model repository (export/triton.py): config.pbtxt parsed with Triton's own ModelConfig schema (the
model_config protobuf of the `tritonclient` wheel) and checked against the exported ONNX graphs; the GPU variant;
perf_analyzer data made of real catalog items that the models accept; the two-part Python model (model.py =
export/triton_model.py) answering like Recommender, through its numpy core and through a stand-in of Triton's
pb_utils that runs the repository's encoder / scorer with onnxruntime (BLS).

No Triton server runs here (none can be installed offline); docs/serving.md shows how to start one.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from export import triton_model
from export.runtime import Recommender
from export.triton import (TritonRepositoryError, model_config_pb2, onnx_signature, publish_item_version,
                           write_repository, write_run_repository)

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


SINGLE, ENCODER, SCORER, RECOMMEND = ("distillrec_single_graph", "distillrec_encoder", "distillrec_scorer",
                                      "distillrec_recommend")


def parse(repo, name=SINGLE):
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
    assert c.name == SINGLE and c.platform == "onnxruntime_onnx" and c.backend == "onnxruntime"
    assert c.max_batch_size == 128 and c.default_model_filename == "model.onnx"
    inputs, outputs = graph_io(cpu_repo / SINGLE / "1" / "model.onnx")
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
    assert (cpu_repo / SINGLE / "1" / "model.onnx").read_bytes() == \
        (onnx_dir / "student.onnx").read_bytes()
    assert json.loads((cpu_repo / SINGLE / "runtime.json").read_text())["item_ids"] == ITEM_IDS
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
    data = json.loads((tmp_path / f"perf_input_{SINGLE}.json").read_text())["data"][0]
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


def test_rewrite_replaces_model_folders_and_removes_stale_ones(onnx_dir, tmp_path):
    write_repository(onnx_dir, tmp_path, max_batch_size=16, preferred_batch_sizes=(4,))
    (tmp_path / SINGLE / "stale.txt").write_text("from the previous version")
    # an older layout's model folder, written by this module (its marker line), and a user's own model
    legacy = tmp_path / "distillrec_student"
    shutil.copytree(tmp_path / SINGLE, legacy)
    (tmp_path / "my_model").mkdir()
    (tmp_path / "my_model" / "config.pbtxt").write_text('name: "my_model"\n')
    write_repository(onnx_dir, tmp_path)
    assert not (tmp_path / SINGLE / "stale.txt").exists() and not legacy.exists()
    assert parse(tmp_path).max_batch_size == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [ENCODER, RECOMMEND, SCORER, SINGLE, "my_model", "perf_input_ids.json"]
        + [f"perf_input_{m}.json" for m in (ENCODER, RECOMMEND, SINGLE)])
    write_repository(onnx_dir, tmp_path, single_graph=False)  # the single graph's folder and perf file go
    assert not (tmp_path / SINGLE).exists() and not (tmp_path / f"perf_input_{SINGLE}.json").exists()


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(preferred_batch_sizes=(8, 256)), ValueError, "preferred_batch_sizes"),
    (dict(max_batch_size=-1), ValueError, "max_batch_size"),
    (dict(instances=0), ValueError, "instances"),
    (dict(trt_precision="FP8"), ValueError, "trt_precision"),
    (dict(prefix="a/b"), ValueError, "prefix"),
    (dict(python_instances=0), ValueError, "python_instances"),
    (dict(empty_history="zero"), ValueError, "empty_history"),
    (dict(encoder_file="encoder.missing.onnx"), TritonRepositoryError, "encoder.missing.onnx is missing"),
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
    assert write_run_repository(run, cfg) == run / "triton"  # what `distillrec triton runs/<name>` calls
    assert MC.ModelInstanceGroup.Kind.Name(parse(run / "triton").instance_group[0].kind) == "KIND_CPU"
    assert {p.name for p in (run / "triton").iterdir() if p.is_dir()} == {ENCODER, SCORER, RECOMMEND, SINGLE}
    cfg.export.providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    write_run_repository(run, cfg, instances=3)
    c = parse(run / "triton")
    assert MC.ModelInstanceGroup.Kind.Name(c.instance_group[0].kind) == "KIND_GPU" and c.instance_group[0].count == 3
    with pytest.raises(TritonRepositoryError, match="distillrec export"):
        write_run_repository(tmp_path / "empty-run")


# ------------------------------------------------------------------------------------------------ perf data
def test_perf_input_uses_real_ids_and_model_shapes(cpu_repo, onnx_dir):
    data = json.loads((cpu_repo / f"perf_input_{SINGLE}.json").read_text())["data"]
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
    data = json.loads((cpu_repo / f"perf_input_{SINGLE}.json").read_text())["data"]
    readable = json.loads((cpu_repo / "perf_input_ids.json").read_text())["requests"]
    sess = ort.InferenceSession(str(cpu_repo / SINGLE / "1" / "model.onnx"),
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


# ------------------------------------------------------------------------------------------------ two-part
def load_model_py(repo, version):
    """The repository's model.py imported as a module (what Triton's Python backend runs)."""
    import importlib.util
    import sys
    path = repo / RECOMMEND / str(version) / "model.py"
    spec = importlib.util.spec_from_file_location(f"_triton_model_py_{version}_{id(repo)}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def onnx_runner(path):
    """feed -> {output: array}: encoder.onnx / scorer.onnx through onnxruntime (the test's BLS)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return lambda feed: dict(zip(names, sess.run(names, feed)))


def table_version(onnx_dir):
    return int((onnx_dir / "items" / "CURRENT").read_text().strip()[1:])


def test_two_part_configs_match_their_graphs(cpu_repo, onnx_dir):
    enc, sc, py = parse(cpu_repo, ENCODER), parse(cpu_repo, SCORER), parse(cpu_repo, RECOMMEND)
    for c, f in ((enc, "encoder.onnx"), (sc, "scorer.onnx")):
        assert c.platform == "onnxruntime_onnx" and c.max_batch_size == 128
        assert c.WhichOneof("scheduling_choice") == "dynamic_batching"
        inputs, outputs = graph_io(onnx_dir / f)
        check_against_graph(c.input, inputs)
        check_against_graph(c.output, outputs)
        assert (cpu_repo / c.name / "1" / "model.onnx").read_bytes() == (onnx_dir / f).read_bytes()
    assert [i.name for i in enc.input] == ["history_vectors", "history_ratings", "history_length"]
    assert {o.name for o in enc.output} == {"user_vector", "rating_user", "like_user"}
    assert py.backend == "python" and py.max_batch_size == 128 and not py.platform
    assert py.version_policy.WhichOneof("policy_choice") == "latest" and py.version_policy.latest.num_versions == 1
    assert MC.ModelInstanceGroup.Kind.Name(py.instance_group[0].kind) == "KIND_CPU"
    assert {i.name: (MC.DataType.Name(i.data_type), list(i.dims), i.optional) for i in py.input} == {
        "history_items": ("TYPE_STRING", [-1], False), "history_ratings": ("TYPE_FP32", [-1], True),
        "k": ("TYPE_INT32", [1], True), "exclude_seen": ("TYPE_BOOL", [1], True),
        "exclude": ("TYPE_STRING", [-1], True), "allow": ("TYPE_STRING", [-1], True),
        "candidates": ("TYPE_STRING", [-1], True)}
    assert [o.name for o in py.output] == ["item_ids", "scores", "rating", "like_logit"]
    params = {k: v.string_value for k, v in py.parameters.items()}
    assert params == {"encoder_model": ENCODER, "encoder_max_batch_size": "128", "scorer_model": SCORER,
                      "scorer_max_batch_size": "128", "unknown_items": "error", "empty_history": "error",
                      "pad_to": "max_history"}


def test_gpu_two_part_configs(onnx_dir, tmp_path):
    repo = write_repository(onnx_dir, tmp_path, gpu=True, warmup=True, max_batch_size=64, preferred_batch_sizes=(8,))
    enc = parse(repo, ENCODER)
    assert MC.ModelInstanceGroup.Kind.Name(enc.instance_group[0].kind) == "KIND_GPU"
    p = dict(enc.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters)
    d = graph_io(onnx_dir / "encoder.onnx")[0][0][2][2]  # the fixed dim of history_vectors
    hi = dict(s.split(":") for s in p["trt_profile_max_shapes"].split(","))
    assert hi == {"history_vectors": f"64x{MAX_HISTORY}x{d}", "history_ratings": f"64x{MAX_HISTORY}",
                  "history_length": "64"}
    (w,) = enc.model_warmup
    assert {k: list(v.dims) for k, v in w.inputs.items()} == {
        "history_vectors": [MAX_HISTORY, d], "history_ratings": [MAX_HISTORY], "history_length": [1]}
    sc = parse(repo, SCORER)
    lo = dict(s.split(":") for s in dict(sc.optimization.execution_accelerators.gpu_execution_accelerator[0]
                                         .parameters)["trt_profile_min_shapes"].split(","))
    assert lo["rating_items"].startswith("1x1x") and lo["rating_user"].startswith("1x")
    # the Python model stays on the CPU: numpy; the GPU work is the encoder's and the scorer's
    assert MC.ModelInstanceGroup.Kind.Name(parse(repo, RECOMMEND).instance_group[0].kind) == "KIND_CPU"


def test_repository_layout(cpu_repo, onnx_dir):
    import py_compile
    v = table_version(onnx_dir)
    model = cpu_repo / RECOMMEND
    assert sorted(p.name for p in model.iterdir()) == [str(v), "config.pbtxt"]
    vdir = model / str(v)
    assert (vdir / "model.py").read_bytes() == Path(triton_model.__file__).read_bytes()
    py_compile.compile(str(vdir / "model.py"), cfile=str(vdir.parent.parent / ".pyc-check"), doraise=True)
    (vdir.parent.parent / ".pyc-check").unlink()
    src = onnx_dir / "items" / f"v{v:06d}"
    want = sorted(p.name for p in src.iterdir() if p.is_file() and p.name != "text.npy")
    assert sorted(p.name for p in (vdir / "items").iterdir()) == want and "vectors.npy" in want
    for name in want:
        assert (vdir / "items" / name).read_bytes() == (src / name).read_bytes()
    assert json.loads((vdir / "runtime.json").read_text()) == json.loads((onnx_dir / "runtime.json").read_text())
    for name in (ENCODER, SCORER, SINGLE):
        assert sorted(p.name for p in (cpu_repo / name / "1").iterdir()) == ["model.onnx"]


def test_vendored_top_k_equals_retrieval():
    from export.retrieval import top_k_indices
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 60))
        s = rng.integers(0, 5, n).astype(np.float32)  # many ties
        s[rng.random(n) < 0.1] = np.nan
        banned = set(rng.integers(0, n, int(rng.integers(0, n + 1))).tolist())
        k = int(rng.integers(1, n + 3))
        np.testing.assert_array_equal(triton_model.top_k_indices(s, k, banned), top_k_indices(s, k, banned))
        np.testing.assert_array_equal(triton_model.top_k_indices(s, k), top_k_indices(s, k))


def random_requests(seed, n=12):
    rng = np.random.default_rng(seed)
    hists, rates, excl, allow = [], [], [], []
    for j in range(n):
        length = int(rng.integers(1, MAX_HISTORY + 6))  # some longer than max_history: truncated, all seen
        hists.append([ITEM_IDS[i] for i in rng.integers(0, N_ITEMS, length)])
        rates.append([float(x) for x in rng.integers(0, 6, length)])
        excl.append(None if j % 3 == 0 else [ITEM_IDS[i] for i in rng.integers(0, N_ITEMS, 5)] + ["not-an-id"])
        allow.append([ITEM_IDS[i] for i in rng.choice(N_ITEMS, 12, replace=False)] if j % 4 == 1 else None)
    return hists, rates, excl, allow


@pytest.mark.parametrize("pad_to", ["longest", "max_history"])
def test_numpy_core_equals_recommender(cpu_repo, onnx_dir, pad_to):
    mod = load_model_py(cpu_repo, table_version(onnx_dir))
    vdir = cpu_repo / RECOMMEND / str(table_version(onnx_dir))
    core = mod.RecommendCore(vdir, onnx_runner(cpu_repo / ENCODER / "1" / "model.onnx"),
                             onnx_runner(cpu_repo / SCORER / "1" / "model.onnx"), pad_to=pad_to)
    rec = Recommender(onnx_dir, mode="two_part", retrieval="exact", intra_op_threads=1)
    hists, rates, excl, allow = random_requests(1)
    for k, exclude_seen in ((10, True), (5, False), (N_ITEMS, True)):
        got = core.recommend_batch(hists, rates, k=k, exclude_seen=exclude_seen, exclude=excl, allow=allow)
        want = rec.recommend_batch(hists, rates, k=k, exclude_seen=exclude_seen, exclude=excl, allow=allow)
        for g, w in zip(got, want):
            assert [i for i, _ in g] == [i for i, _ in w]  # same ids, same order
            np.testing.assert_allclose([s for _, s in g], [s for _, s in w], rtol=1e-5, atol=1e-5)
    seen = set(hists[0])
    assert not seen & {i for i, _ in core.recommend_batch(hists[:1], rates[:1], k=N_ITEMS)[0]}
    assert {i for i, _ in core.recommend_batch(hists[1:2], k=N_ITEMS, allow=allow[1:2])[0]} <= set(allow[1])
    cands = [[ITEM_IDS[(3 * j + t) % N_ITEMS] for t in range(1 + j % 4)] for j in range(len(hists))]
    for g, w in zip(core.score_batch(hists, cands, rates), rec.score_batch(hists, cands, rates)):
        np.testing.assert_allclose(g["rating"], w["rating"], atol=1e-5)
        np.testing.assert_allclose(g["like_logit"], w["like_logit"], atol=1e-5)


def test_numpy_core_errors_and_popularity(cpu_repo, onnx_dir):
    vdir = cpu_repo / RECOMMEND / str(table_version(onnx_dir))
    enc = onnx_runner(cpu_repo / ENCODER / "1" / "model.onnx")
    core = triton_model.RecommendCore(vdir, enc)
    with pytest.raises(triton_model.RequestError, match="unknown item id"):
        core.recommend_batch([["m100", "nope"]])
    with pytest.raises(triton_model.RequestError, match="ratings must lie"):
        core.recommend_batch([["m100"]], [[9]])
    with pytest.raises(triton_model.RequestError, match="empty history"):
        core.recommend_batch([[""]])
    with pytest.raises(triton_model.RequestError, match="no rating/like head"):
        core.score_batch([["m100"]], [["m101"]])
    pop = triton_model.RecommendCore(vdir, enc, empty_history="popularity", unknown_items="drop")
    rec = Recommender(onnx_dir, mode="two_part", retrieval="exact", empty_history="popularity", unknown_items="drop")
    h = [["nope"], ["m100", "nope", "m105"]]
    assert pop.recommend_batch(h, k=5, exclude=[["m101"], None]) == rec.recommend_batch(h, k=5, exclude=[["m101"], None])
    with pytest.raises(ValueError, match="pad_to"):
        triton_model.RecommendCore(vdir, enc, pad_to="shortest")


class FakePbUtils:
    """A stand-in for triton_python_backend_utils: BLS runs the repository's ONNX models with onnxruntime,
    applying each config's reshape (history_length arrives as [B, 1]) the way Triton's backend does."""

    TRITONSERVER_MEMORY_CPU = 0

    def __init__(self, repo):
        self.repo, self.calls = repo, []
        outer = self

        class Tensor:
            def __init__(self, name, array):
                self._name, self._a = name, np.asarray(array)

            def name(self):
                return self._name

            def as_numpy(self):
                return self._a

            def is_cpu(self):
                return True

        class TritonError:
            def __init__(self, msg):
                self.msg = msg

            def message(self):
                return self.msg

        class InferenceResponse:
            def __init__(self, output_tensors, error=None):
                self.output_tensors, self.err = output_tensors, error

            def has_error(self):
                return self.err is not None

            def error(self):
                return self.err

        class InferenceRequest:
            def __init__(self, model_name, requested_output_names, inputs, preferred_memory=None, outputs=None):
                self.model, self.names, self.inputs = model_name, requested_output_names, inputs
                self.wanted = outputs

            def requested_output_names(self):
                return self.wanted or []

            def exec(self):
                return outer._bls(self)

        self.Tensor, self.TritonError, self.InferenceResponse = Tensor, TritonError, InferenceResponse
        self.InferenceRequest = InferenceRequest
        self.PreferredMemory = lambda kind, device=0: (kind, device)
        self.TritonModelException = RuntimeError

    def _bls(self, req):
        c = parse(self.repo, req.model)
        feed = {}
        for t in req.inputs:
            spec = [i for i in c.input if i.name == t.name()][0]
            a = t.as_numpy()
            assert a.shape[0] <= c.max_batch_size and list(a.shape[1:]) == [
                d if d != -1 else a.shape[1 + j] for j, d in enumerate(spec.dims)], (t.name(), a.shape)
            feed[t.name()] = a.reshape(a.shape[0]) if spec.HasField("reshape") else a
        self.calls.append((req.model, {n: a.shape for n, a in feed.items()}))
        out = onnx_runner(self.repo / req.model / "1" / "model.onnx")(feed)
        return self.InferenceResponse([self.Tensor(n, out[n]) for n in req.names])

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return next((t for t in request.inputs if t.name() == name), None)

    @staticmethod
    def get_output_tensor_by_name(response, name):
        return next((t for t in response.output_tensors if t.name() == name), None)


def test_python_model_through_bls_equals_recommender(cpu_repo, onnx_dir, monkeypatch):
    v = table_version(onnx_dir)
    mod = load_model_py(cpu_repo, v)
    pb = FakePbUtils(cpu_repo)
    monkeypatch.setattr(mod, "pb_utils", pb)
    model = mod.TritonPythonModel()
    model.initialize({"model_config": json.dumps({
        "parameters": {k: {"string_value": x.string_value} for k, x in parse(cpu_repo, RECOMMEND).parameters.items()},
        "output": [{"name": o.name} for o in parse(cpu_repo, RECOMMEND).output]}),
        "model_repository": str(cpu_repo / RECOMMEND), "model_version": str(v)})
    hists, rates, excl, allow = random_requests(2, n=6)

    def strings(rows, width):  # "" padding at the front, as a client pads
        return np.array([[b""] * (width - len(r)) + [x.encode() for x in r] for r in rows], dtype=object)

    def request(rows, wanted=(), **tensors):
        r = pb.InferenceRequest(RECOMMEND, [], [pb.Tensor(n, a) for n, a in tensors.items()], outputs=list(wanted))
        return r

    w = max(len(h) for h in hists)
    r1 = request(hists[:3], history_items=strings(hists[:3], w),
                 history_ratings=np.array([[0.0] * (w - len(r)) + r for r in rates[:3]], np.float32),
                 k=np.array([[5], [7], [3]], np.int32), exclude=strings([e or [] for e in excl[:3]], 6),
                 allow=strings([a or [] for a in allow[:3]], 12))
    cands = [["m100", "m101", "m102"], ["m103", "", ""]]
    r2 = request(hists[3:5], history_items=strings(hists[3:5], w), exclude_seen=np.array([[False], [True]]),
                 candidates=np.array([[c.encode() for c in row] for row in cands], dtype=object))
    r3 = request([], history_items=strings([["m100", "unknown-id"]], 2))  # answered with an error, alone
    r4 = request([], wanted=["rating"], history_items=strings([["m100"]], 1))  # rating without candidates
    out = model.execute([r1, r2, r3, r4])
    assert len(out) == 4 and "unknown item id" in out[2].error().message()
    assert "candidates" in out[3].error().message()
    assert sum(1 for m, _ in pb.calls if m == ENCODER) == 1  # one encoder call for every row of the batch
    enc_shapes = [s for m, s in pb.calls if m == ENCODER][0]
    assert enc_shapes["history_vectors"][:2] == (5, MAX_HISTORY)  # padded to max_history: one shape
    rec = Recommender(onnx_dir, mode="two_part", retrieval="exact", intra_op_threads=1)
    got1 = {t.name(): t.as_numpy() for t in out[0].output_tensors}
    assert got1["item_ids"].shape == (3, 7) and set(got1) == {"item_ids", "scores"}
    for row, k in enumerate((5, 7, 3)):
        want = rec.recommend(hists[row], rates[row], k=k, exclude=excl[row], allow=allow[row])
        ids = [x.decode() for x in got1["item_ids"][row] if x]
        assert ids == [i for i, _ in want]
        np.testing.assert_allclose(got1["scores"][row][:len(ids)], [s for _, s in want], atol=1e-5)
        assert not any(got1["scores"][row][len(ids):])
    got2 = {t.name(): t.as_numpy() for t in out[1].output_tensors}
    assert set(got2) == {"item_ids", "scores", "rating", "like_logit"}
    for row in range(2):
        want = rec.recommend(hists[3 + row], k=10, exclude_seen=row == 1)
        assert [x.decode() for x in got2["item_ids"][row] if x] == [i for i, _ in want]
        real = [c for c in cands[row] if c]
        s = rec.score(hists[3 + row], real)
        np.testing.assert_allclose(got2["rating"][row][:len(real)], s["rating"], atol=1e-5)
        np.testing.assert_allclose(got2["like_logit"][row][:len(real)], s["like_logit"], atol=1e-5)
        assert not got2["rating"][row][len(real):].any()


def test_perf_input_of_two_part_models(cpu_repo, onnx_dir):
    readable = json.loads((cpu_repo / "perf_input_ids.json").read_text())["requests"]
    rec_data = json.loads((cpu_repo / f"perf_input_{RECOMMEND}.json").read_text())["data"]
    enc_data = json.loads((cpu_repo / f"perf_input_{ENCODER}.json").read_text())["data"]
    vectors = np.load(cpu_repo / RECOMMEND / str(table_version(onnx_dir)) / "items" / "vectors.npy")
    sess = ort.InferenceSession(str(cpu_repo / ENCODER / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for r, e, x in zip(readable, rec_data, enc_data):
        n = len(r["history"])
        assert e["history_items"]["shape"] == [MAX_HISTORY]
        assert e["history_items"]["content"] == [""] * (MAX_HISTORY - n) + r["history"]
        rows = [ITEM_IDS.index(i) for i in r["history"]]
        hv = np.asarray(x["history_vectors"]["content"], np.float32).reshape(x["history_vectors"]["shape"])
        np.testing.assert_allclose(hv[MAX_HISTORY - n:], vectors[rows], atol=1e-6)
        assert x["history_length"] == {"content": [n], "shape": [1]}
    feed = {"history_vectors": np.stack([np.asarray(x["history_vectors"]["content"], np.float32).reshape(
                x["history_vectors"]["shape"]) for x in enc_data]),
            "history_ratings": np.stack([np.asarray(x["history_ratings"]["content"], np.float32) for x in enc_data]),
            "history_length": np.array([x["history_length"]["content"][0] for x in enc_data], np.int64)}
    assert np.all(np.isfinite(sess.run(["user_vector"], feed)[0]))  # the encoder takes them as one batch


def test_publish_item_version(onnx_dir, tmp_path):
    from export.item_table import append_items, set_active
    d = tmp_path / "onnx"
    shutil.copytree(onnx_dir, d)
    repo = write_repository(d, tmp_path / "repo")
    v0 = table_version(d)
    meta = json.loads((d / "items" / f"v{v0:06d}" / "meta.json").read_text())
    shapes = {k: v["shape"] for k, v in meta["arrays"].items() if k not in ("active", "popularity")}
    rng = np.random.default_rng(0)
    append_items(d / "items", ["new1", "new2"], {k: rng.normal(size=[2, *s[1:]]).astype(np.float32)
                                                 for k, s in shapes.items()})
    v1 = table_version(d)
    assert publish_item_version(d, repo) == repo / RECOMMEND / str(v1)
    assert sorted(int(p.name) for p in (repo / RECOMMEND).iterdir() if p.is_dir()) == [v0, v1]
    core = load_model_py(repo, v1).RecommendCore(repo / RECOMMEND / str(v1),
                                                  onnx_runner(repo / ENCODER / "1" / "model.onnx"))
    assert core.table.ids[-2:] == ["new1", "new2"] and core.recommend_batch([["new1", "m100"]], k=3)
    set_active(d / "items", ["m100"], False)
    publish_item_version(d, repo, keep=2)
    assert sorted(int(p.name) for p in (repo / RECOMMEND).iterdir() if p.is_dir()) == [v1, table_version(d)]
    parse(repo, RECOMMEND)  # the config is untouched and still valid
    # a repository serving another export's encoder is refused: the table would meet the wrong encoder
    (repo / ENCODER / "1" / "model.onnx").write_bytes(b"another model")
    with pytest.raises(TritonRepositoryError, match="not an encoder of"):
        publish_item_version(d, repo)
    with pytest.raises(TritonRepositoryError, match="distillrec triton"):
        publish_item_version(d, tmp_path / "no-repo")
