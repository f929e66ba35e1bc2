"""Serving runtime (export/runtime.py) internals the service relies on: exact partial top-k, popularity rows that
never reach the model, the TensorRT cache outside a read-only model folder, an explicit intra-op thread count,
and typed request errors.

Uses conftest's tiny exported model (`serving_export`, 40 items); no torch in the code under test.
"""
import os
import shutil
import stat
import warnings

import numpy as np
import onnxruntime as ort
import pytest

from export import contract
from export import runtime as R
from export.runtime import RequestError, Recommender, model_hash, top_k_indices


@pytest.fixture(scope="module")
def onnx_dir(serving_export):
    return serving_export.onnx_dir


@pytest.fixture(scope="module")
def rec(onnx_dir):
    return Recommender(onnx_dir)


# ------------------------------------------------------------------------------------------------ top-k
def _full_sort(scores, k, banned):
    return [i for i in np.argsort(-np.asarray(scores, np.float64), kind="stable") if i not in banned][:k]


def test_top_k_equals_a_full_stable_sort_including_ties():
    rng = np.random.default_rng(0)
    for trial in range(400):
        n = int(rng.integers(1, 60))
        if trial % 3 == 0:  # heavy ties: 4 distinct values
            scores = rng.integers(0, 4, n).astype(np.float32)
        else:
            scores = rng.normal(size=n).astype(np.float32)
            scores[rng.random(n) < 0.2] = scores[0]  # some exact ties with item 0
        if trial % 7 == 0:
            scores[rng.integers(0, n)] = -np.inf
            scores[rng.integers(0, n)] = np.inf
        banned = set(rng.choice(n, size=int(rng.integers(0, n + 1)), replace=False).tolist())
        k = int(rng.integers(1, n + 4))
        got = top_k_indices(scores, k, banned).tolist()
        assert got == _full_sort(scores, k, banned), (trial, scores.tolist(), sorted(banned), k)
        assert len(got) == min(k, n - len(banned))


def test_top_k_removes_banned_items_and_ranks_nan_last():
    scores = np.array([np.nan, 3.0, -np.inf, 1.0, np.nan, 2.0], np.float32)
    assert top_k_indices(scores, 6, {1}).tolist() == [5, 3, 0, 2, 4]  # NaN (as -inf) ties by index with -inf
    assert 1 not in top_k_indices(scores, 6, {1}).tolist()
    assert top_k_indices(scores, 3, set(range(6))).tolist() == []
    assert top_k_indices(scores, 0, set()).tolist() == []


def test_recommend_does_not_sort_the_catalog(rec, monkeypatch):
    want = rec.recommend(["m101", "m105"], k=5)

    def no_full_sort(*a, **k):
        raise AssertionError("the runtime sorted the whole catalog")

    monkeypatch.setattr(np, "argsort", no_full_sort)
    assert rec.recommend(["m101", "m105"], k=5) == want
    assert len(want) == 5 and not {"m101", "m105"} & {i for i, _ in want}


# ------------------------------------------------------------------------------------------------ popularity
class _CountingSession:
    """Wraps an InferenceSession and records the batch rows of every run."""

    def __init__(self, sess):
        self.sess, self.calls = sess, []

    def run(self, names, feed):
        self.calls.append(feed["history_length"].tolist())
        return self.sess.run(names, feed)

    def __getattr__(self, name):
        return getattr(self.sess, name)


@pytest.fixture
def pop(onnx_dir):
    r = Recommender(onnx_dir, empty_history="popularity")
    r.session = _CountingSession(r.session)
    return r


def test_popularity_rows_never_reach_the_model(pop, rec, serving_export):
    # recommend: the empty rows come from popularity; the model runs once, on the one non-empty row only
    out = pop.recommend_batch([[], ["m101", "m102"], []], k=4)
    assert pop.session.calls == [[2]]
    order = np.argsort(-np.array(serving_export.popularity), kind="stable")
    assert [i for i, _ in out[0]] == [serving_export.item_ids[i] for i in order[:4]] and out[2] == out[0]
    assert out[1] == rec.recommend(["m101", "m102"], k=4)
    # score: the same split
    pop.session.calls.clear()
    res = pop.score_batch([["m103"], []], [["m101", "m102"], ["m104", "m105"]])
    assert pop.session.calls == [[1]]
    assert res[1] == {"popularity": pytest.approx(np.array([serving_export.popularity[4],
                                                            serving_export.popularity[5]], np.float32))}
    np.testing.assert_allclose(res[0]["rating"], rec.score(["m103"], ["m101", "m102"])["rating"], atol=1e-5)
    # every row empty: no model call at all
    pop.session.calls.clear()
    pop.recommend_batch([[], []], k=3)
    pop.score_batch([[]], [["m101"]])
    assert pop.session.calls == []


# ------------------------------------------------------------------------------------------------ TensorRT cache
def _read_only_copy(src, dst):
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    return dst


def _restore(folder):
    for p in [folder, *folder.rglob("*")]:
        p.chmod(stat.S_IRWXU | (p.stat().st_mode & 0o777))


def _snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


@pytest.fixture
def trt_listed(monkeypatch):
    """Make this CPU build list TensorRT (as onnxruntime-gpu does); the session then falls back to CPU."""
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: [contract.TRT, contract.CUDA, contract.CPU])


def _tensorrt_recommender(folder, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ProviderFallbackWarning: TensorRT does not really run here
        return Recommender(folder, providers=["tensorrt", "cpu"], **kw)


def test_tensorrt_cache_lives_outside_a_read_only_model_folder(onnx_dir, tmp_path, monkeypatch, trt_listed):
    ro = _read_only_copy(onnx_dir, tmp_path / "mount" / "onnx")
    try:
        before = _snapshot(ro)
        if os.geteuid() != 0:
            assert not os.access(ro, os.W_OK)  # (root ignores modes: the snapshot below still catches a write)
        monkeypatch.setenv(contract.TRT_CACHE_ENV, str(tmp_path / "cache"))
        r = _tensorrt_recommender(ro)
        want = tmp_path / "cache" / model_hash(r.model_path)
        assert r.trt_cache == want and want.is_dir()
        assert r.provider_record["trt_cache"] == str(want) and r.provider_record["chosen"][0] == contract.TRT
        assert _snapshot(ro) == before  # nothing written into the model folder
        assert len(r.recommend(["m101"], k=3)) == 3
        # the argument wins over the environment
        assert _tensorrt_recommender(ro, trt_cache_root=tmp_path / "arg").trt_cache.parent == tmp_path / "arg"
    finally:
        _restore(tmp_path / "mount")


def test_tensorrt_cache_default_is_the_user_cache_dir(onnx_dir, tmp_path, monkeypatch, trt_listed):
    monkeypatch.delenv(contract.TRT_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    h = model_hash(onnx_dir / contract.ENCODER_FILE)  # two-part serving: the encoder is the served graph
    assert _tensorrt_recommender(onnx_dir).trt_cache == tmp_path / "xdg" / "distillrec" / "trt" / h
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _tensorrt_recommender(onnx_dir).trt_cache == tmp_path / "home" / ".cache" / "distillrec" / "trt" / h
    # no TensorRT requested: no cache folder at all
    monkeypatch.setenv(contract.TRT_CACHE_ENV, str(tmp_path / "unused"))
    assert Recommender(onnx_dir, providers=["cpu"]).trt_cache is None and not (tmp_path / "unused").exists()


def test_unwritable_cache_root_still_serves(onnx_dir, tmp_path, monkeypatch, trt_listed):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv(contract.TRT_CACHE_ENV, str(tmp_path / "file" / "trt"))
    r = _tensorrt_recommender(onnx_dir)
    assert r.trt_cache is None and len(r.recommend(["m101"], k=2)) == 2


# ------------------------------------------------------------------------------------------------ threads
@pytest.mark.parametrize("cpus,processes,want", [(16, 1, 4), (16, 4, 2), (16, 16, 1), (8, 1, 4), (2, 1, 1),
                                                 (1, 1, 1), (64, 2, 4)])
def test_default_intra_op_threads(monkeypatch, cpus, processes, want):
    monkeypatch.setattr(R, "usable_cpus", lambda: cpus)
    assert R.default_intra_op_threads(processes) == want


def test_intra_op_threads_are_explicit_in_the_session(onnx_dir, monkeypatch):
    monkeypatch.setattr(R, "usable_cpus", lambda: 12)
    default = Recommender(onnx_dir)
    assert default.intra_op_threads == 4 == default.session.get_session_options().intra_op_num_threads
    for n in (0, 1, 3):  # 0 = onnxruntime's own default (one thread per physical core)
        r = Recommender(onnx_dir, intra_op_threads=n)
        assert r.intra_op_threads == n == r.session.get_session_options().intra_op_num_threads
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="intra_op_threads"):
            Recommender(onnx_dir, intra_op_threads=bad)


# ------------------------------------------------------------------------------------------------ errors
def test_request_errors_are_typed(rec, onnx_dir):
    for call in (lambda: rec.recommend(["nope"]), lambda: rec.recommend(["m101"], k=0),
                 lambda: rec.recommend(["m101"], ratings=[9]), lambda: rec.score(["m101"], []),
                 lambda: rec.predict_arrays(np.zeros((1, 1)), np.zeros((1, 1)), np.zeros(1, np.int64))):
        with pytest.raises(RequestError):
            call()
    # a wrong constructor argument is the operator's mistake, not a request's
    with pytest.raises(ValueError) as e:
        Recommender(onnx_dir, unknown_items="ignore")
    assert not isinstance(e.value, RequestError)
