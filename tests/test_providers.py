"""Execution providers on a CPU machine: TensorRT/CUDA requested -> CPU serves, with a warning and a record.

The GPU side is checked by export/gpu_check.py on a GPU machine (docs/export.md)."""
import json
import logging
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

from distill.config import StudentConfig
from export.config import ExportConfig
from distill.student import Student
from export import providers as P
from export.onnx_export import export_student
from export.runtime import Recommender, UnsupportedProviderError

N_ITEMS = 30


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("prov")
    torch.manual_seed(0)
    m = Student(StudentConfig(dim=16, layers=1, heads=2, max_len=8, tower_hidden=16), N_ITEMS, ["next_item"])
    m.save(run / "student", extra=dict(item_ids=[str(i) for i in range(N_ITEMS)], max_history=8))
    export_student(run / "student", run / "onnx", ExportConfig(), variants=())
    return run / "onnx"


def test_names_are_resolved_and_ordered():
    chosen, rec = P.build_providers(["cpu", "CUDA", "TensorRT"], filter_available=False, max_history=50)
    assert rec["requested"] == [P.TRT, P.CUDA, P.CPU]
    assert [P._name(p) for p in chosen] == [P.TRT, P.CUDA, P.CPU]
    _, rec = P.build_providers(["CPUExecutionProvider", "trt"], filter_available=False)
    assert rec["requested"] == [P.TRT, P.CPU]
    _, rec = P.build_providers("cuda", filter_available=False)
    assert rec["requested"] == [P.CUDA] and rec["chosen"] == [P.CUDA, P.CPU]  # CPU: always the last resort
    # (name, options) pairs keep their options
    chosen, _ = P.build_providers([("cuda", {"device_id": 1})], filter_available=False)
    assert chosen[0] == (P.CUDA, {"device_id": 1})


@pytest.mark.parametrize("bad", ["tpu", "", "CUDAExecutionProviderX", 3])
def test_unknown_provider_name_is_a_value_error(bad):
    with pytest.raises(ValueError, match="execution provider|non-empty"):
        P.build_providers([bad])


def test_unknown_provider_in_recommender(onnx_dir):
    with pytest.raises(ValueError, match="unknown execution provider 'tpu'"):
        Recommender(onnx_dir, providers=["tpu", "cpu"])


def test_tensorrt_options_cover_every_dynamic_input(tmp_path):
    cache = tmp_path / "cache" / "trt" / "abc"
    chosen, record = P.build_providers(["tensorrt"], cache_dir=cache, max_history=50, filter_available=False)
    name, opts = chosen[0]
    assert name == P.TRT and cache.is_dir() and record["trt_cache"] == str(cache)
    assert list(cache.iterdir()) == []  # the write probe leaves nothing behind
    assert opts["trt_fp16_enable"] is True
    assert opts["trt_engine_cache_enable"] is True and opts["trt_engine_cache_path"] == str(cache)
    assert opts["trt_timing_cache_enable"] is True and opts["trt_timing_cache_path"] == str(cache)
    assert opts["trt_profile_min_shapes"] == "history_items:1x1,history_ratings:1x1,history_length:1,candidates:1x1"
    assert opts["trt_profile_opt_shapes"] == ("history_items:32x50,history_ratings:32x50,history_length:32,"
                                              "candidates:32x100")
    assert opts["trt_profile_max_shapes"] == ("history_items:128x50,history_ratings:128x50,history_length:128,"
                                              "candidates:128x1000")
    # a short max_history caps opt and max; overrides are merged
    short = P.trt_profile_shapes(8, profile={"max": {"batch": 16}})
    assert short["trt_profile_opt_shapes"].startswith("history_items:16x8,")
    assert short["trt_profile_max_shapes"].startswith("history_items:16x8,")
    with pytest.raises(ValueError, match="min/opt/max"):
        P.trt_profile_shapes(8, profile={"mid": {}})
    assert P.cuda_options(0)["device_id"] == 0


def test_unwritable_cache_dir_runs_tensorrt_without_a_cache(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # mkdir below a file fails even for root (chmod would not stop root)
    with caplog.at_level(logging.WARNING, logger="distillrec.providers"):
        chosen, record = P.build_providers(["tensorrt", "cpu"], cache_dir=blocker / "trt", max_history=8,
                                           filter_available=False)
    name, opts = chosen[0]
    assert name == P.TRT and record["trt_cache"] is None
    assert not any(k.startswith(("trt_engine_cache", "trt_timing_cache")) for k in opts)
    assert opts["trt_fp16_enable"] is True and "trt_profile_max_shapes" in opts  # the rest is unchanged
    assert any("not writable" in r.getMessage() for r in caplog.records)
    # a caller's own (name, options) pair keeps its options
    own = {"trt_engine_cache_enable": True, "trt_engine_cache_path": "/elsewhere"}
    chosen, _ = P.build_providers([("tensorrt", own)], cache_dir=blocker / "trt", filter_available=False)
    assert chosen[0] == (P.TRT, own)


def test_provider_names_come_from_the_contract():
    from export import contract
    assert (P.TRT, P.CUDA, P.CPU) == (contract.TRT, contract.CUDA, contract.CPU)
    assert P.ALIASES is contract.PROVIDER_ALIASES and list(P.STUDENT_INPUTS) == list(contract.INPUT_NAMES)


def test_gpu_request_on_cpu_falls_back_with_a_warning(onnx_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="distillrec.providers"):
        with pytest.warns(P.ProviderFallbackWarning, match="requested execution provider TensorrtExecutionProvider"
                                                           ".*runs CPUExecutionProvider"):
            rec = Recommender(onnx_dir, providers=["tensorrt", "cuda", "cpu"])
    assert rec.providers == [P.CPU]
    assert rec.requested_providers == [P.TRT, P.CUDA, P.CPU]
    assert rec.provider_record["fallback"] is True and rec.provider_record["actual"] == [P.CPU]
    if P.TRT not in ort.get_available_providers():
        assert rec.provider_record["dropped"] == [P.TRT, P.CUDA]
    assert any("TensorrtExecutionProvider" in r.getMessage() for r in caplog.records)
    assert len(rec.recommend(["1", "2"], k=3)) == 3  # and it serves


def test_listed_but_not_working_gpu_provider_is_detected(onnx_dir, monkeypatch):
    """onnxruntime-gpu on a machine without a GPU lists CUDA as available; only the session tells the truth."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [P.CUDA, P.CPU])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = Recommender(onnx_dir, providers=["cuda"])
    ours = [w for w in caught if issubclass(w.category, P.ProviderFallbackWarning)]
    assert len(ours) == 1 and "CUDAExecutionProvider" in str(ours[0].message)
    assert rec.provider_record["dropped"] == [] and rec.provider_record["chosen"] == [P.CUDA, P.CPU]
    assert rec.providers == [P.CPU] and rec.requested_providers == [P.CUDA]


def test_strict_providers_raise(onnx_dir):
    with pytest.raises(UnsupportedProviderError, match="requested execution provider CUDAExecutionProvider"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Recommender(onnx_dir, providers=["cuda", "cpu"], strict_providers=True)


def test_cpu_request_is_silent(onnx_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error", P.ProviderFallbackWarning)
        rec = Recommender(onnx_dir, providers=["cpu"])
        default = Recommender(onnx_dir)  # runtime.json "providers" (the config's)
    assert rec.providers == default.providers == [P.CPU]
    assert rec.provider_record["fallback"] is False and rec.provider_record["fallback_warning"] is None
    assert json.loads((onnx_dir / "runtime.json").read_text())["providers"] == ["CPUExecutionProvider"]


def test_create_session_records_what_runs(onnx_dir):
    providers, record = P.build_providers(["cpu"])
    sess, rec = P.create_session(onnx_dir / "student.onnx", providers, record)
    assert rec["actual"] == sess.get_providers() == [P.CPU]
    out = sess.run(None, {"history_items": np.zeros((1, 2), np.int64), "history_ratings": np.zeros((1, 2), np.float32),
                          "history_length": np.array([2]), "candidates": np.zeros((1, 1), np.int64)})
    assert out[0].shape == (1, N_ITEMS)
