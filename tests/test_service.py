"""HTTP service (export/service.py): every endpoint through FastAPI's TestClient, answers equal to calling the
Recommender directly, every bad input a 4xx JSON error naming the problem, server faults a generic 500 whose
detail is logged and never echoed, worker settings passed without os.environ, and real uvicorn servers.

The tiny exported student (40 items) is conftest's session fixture `serving_export`.
"""
import asyncio
import importlib.util
import inspect
import json
import logging
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from export.item_table import load_table, write_table
from export.runtime import Recommender, RuntimeArtifactError, default_intra_op_threads
from export.service import DEFAULT_MAX_K, ServiceSettings, build_app, create_app

REPO = Path(__file__).resolve().parents[1]
N_ITEMS, MAX_HISTORY = 40, 10
ITEM_IDS = [f"m{100 + i}" for i in range(N_ITEMS)]
POPULARITY = [int(x) for x in np.random.default_rng(3).permutation(N_ITEMS) * 7 + 1]


@pytest.fixture(scope="module")
def onnx_dir(serving_export):
    # the constants above describe conftest's tiny model: fail loudly if the two drift apart
    assert serving_export.item_ids == ITEM_IDS and serving_export.popularity == POPULARITY
    assert serving_export.max_history == MAX_HISTORY
    return serving_export.onnx_dir


@pytest.fixture(scope="module")
def rec(onnx_dir):
    return Recommender(onnx_dir)


@pytest.fixture(scope="module")
def client(rec):
    """No lifespan run: /recommend is answered unbatched in the threadpool."""
    return TestClient(create_app(rec), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def batched_client(rec):
    """The app's lifespan running: /recommend goes through the micro-batcher (batches of one here)."""
    with TestClient(create_app(rec), raise_server_exceptions=False) as c:
        assert c.get("/ready").status_code == 200
        yield c


def _items(pairs):
    return [{"id": i, "score": s} for i, s in pairs]


def _assert_same_answer(got_items: list, want_pairs: list) -> None:
    """A batched answer equals the batch-1 answer: the same ids in the same order and the same scores up to the
    float32 rounding of a longer padded history axis (rows padded to another length differ in the last bits;
    rows of equal length are bit-identical)."""
    assert [x["id"] for x in got_items] == [i for i, _ in want_pairs]
    np.testing.assert_allclose([x["score"] for x in got_items], [s for _, s in want_pairs], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ endpoints
def test_health_and_metadata(client, rec):
    h = client.get("/health")
    assert h.status_code == 200
    body = h.json()
    assert body["status"] == "ok" and body["provider"] == rec.providers[0] == "CPUExecutionProvider"
    assert body["providers"] == rec.providers and body["model"].endswith("/encoder.onnx")

    m = client.get("/metadata").json()
    assert m["n_items"] == N_ITEMS and m["tasks"] == ["next_item", "rating", "like"]
    assert m["max_history"] == MAX_HISTORY and m["top_k"] == 10 and m["schema_version"] == 2
    assert m["providers"] == rec.providers and m["data_hash"] == "abc123"
    assert m["mode"] == "two_part" and m["n_active"] == N_ITEMS and m["retrieval"] == "exact"
    assert m["inputs"] == ["history_vectors", "history_ratings", "history_length"]
    assert m["outputs"] == ["user_vector", "rating_user", "like_user"]
    assert "item_ids" not in m and "item_popularity" not in m
    assert len(json.dumps(m)) < 4000  # a summary, not the catalog


class _Spy:
    """The real Recommender behind a wrapper that records, per recommend_batch call, whether it ran on a thread
    with a running event loop (it must not: the onnxruntime call would block every other request)."""

    def __init__(self, rec):
        self._rec, self.on_loop = rec, []

    def __getattr__(self, name):
        return getattr(self._rec, name)

    def recommend_batch(self, *a, **kw):
        try:
            asyncio.get_running_loop()
            self.on_loop.append(True)
        except RuntimeError:
            self.on_loop.append(False)
        return self._rec.recommend_batch(*a, **kw)


def test_endpoints_are_sync_so_onnxruntime_runs_in_the_threadpool(client):
    """Every endpoint but /recommend is a plain def (FastAPI's threadpool); /recommend is async and hands the
    session call to the batcher thread (or the threadpool): never the event loop."""
    routes = {getattr(r, "path", ""): r for r in client.app.routes}
    assert not any(inspect.iscoroutinefunction(routes[p].endpoint) for p in
                   ("/recommend/batch", "/score", "/score/batch", "/health", "/metadata"))
    assert inspect.iscoroutinefunction(routes["/recommend"].endpoint)


@pytest.mark.parametrize("batching,lifespan", [(True, True), (True, False), (False, True)])
def test_recommend_inference_never_runs_on_the_event_loop(rec, batching, lifespan):
    spy = _Spy(rec)
    c = TestClient(create_app(spy, batching=batching))
    if lifespan:
        with c:
            assert c.post("/recommend", json={"history": ["m101"], "k": 3}).status_code == 200
    else:  # no lifespan run (no batcher): answered in the threadpool
        assert c.post("/recommend", json={"history": ["m101"], "k": 3}).status_code == 200
    assert spy.on_loop == [False]


@pytest.mark.parametrize("body,kwargs", [
    ({"history": ["m105", "m117", "m103"]}, {}),
    ({"history": ["m105", "m117", "m103"], "ratings": [5, 3.5, 0], "k": 7}, dict(ratings=[5, 3.5, 0], k=7)),
    ({"history": ["m105", "m117"], "k": 5, "exclude": ["m110", "not-in-catalog"]},
     dict(k=5, exclude=["m110", "not-in-catalog"])),
    ({"history": ["m105", "m117"], "k": N_ITEMS, "exclude_seen": False}, dict(k=N_ITEMS, exclude_seen=False)),
    ({"history": [ITEM_IDS[i % N_ITEMS] for i in range(25)], "k": 3}, dict(k=3)),  # longer than max_history
])
@pytest.mark.parametrize("which", ["client", "batched_client"])
def test_recommend_equals_runtime(request, rec, body, kwargs, which):
    r = request.getfixturevalue(which).post("/recommend", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["items"] == _items(rec.recommend(body["history"], **kwargs))
    assert out["provider"] == rec.providers[0] and out["model"].endswith("encoder.onnx")
    banned = set() if kwargs.get("exclude_seen") is False else set(body["history"])
    banned |= set(kwargs.get("exclude") or []) & set(ITEM_IDS)
    assert len(out["items"]) == min(kwargs.get("k", 10), N_ITEMS - len(banned))
    assert not banned & {x["id"] for x in out["items"]}
    assert "note" not in out  # k items came back: nothing to explain


def test_allow_restricts_the_answer(client, batched_client, rec):
    """`allow`: only those ids may come back (ids outside the catalog ignored), the seen ones still excluded."""
    allow = ["m110", "m111", "m112", "m105", "zzz"]
    others = [i for i in ITEM_IDS if i not in allow]
    want = _items(rec.recommend(["m105", "m117"], k=3, exclude=others))
    for c in (client, batched_client):
        r = c.post("/recommend", json={"history": ["m105", "m117"], "k": 3, "allow": allow})
        assert r.status_code == 200, r.text
        _assert_same_answer(r.json()["items"], [(x["id"], x["score"]) for x in want])
        assert {x["id"] for x in want} == {"m110", "m111", "m112"}
        short = c.post("/recommend", json={"history": ["m105"], "k": 3, "allow": ["m105", "m106"]}).json()
        assert [x["id"] for x in short["items"]] == ["m106"] and "only 1 of the requested k=3" in short["note"]
    rb = client.post("/recommend/batch", json={"histories": [["m105"], ["m106"]], "k": 2,
                                               "allow": [["m120", "m121", "m122"], None]})
    assert rb.status_code == 200, rb.text
    res = rb.json()["results"]
    assert {x["id"] for x in res[0]["items"]} <= {"m120", "m121", "m122"}
    _assert_same_answer(res[1]["items"], rec.recommend(["m106"], k=2))
    bad = client.post("/recommend/batch", json={"histories": [["m105"]], "allow": [["m1"], ["m2"]]})
    assert bad.status_code == 400 and "allow" in bad.json()["detail"]
    assert client.post("/recommend", json={"history": ["m105"], "allow": [1.5]}).status_code == 422


def test_int_ids_are_matched_as_strings(tmp_path, onnx_dir):
    # a catalog of numeric ids (like MovieLens): JSON ints and strings name the same item
    d = tmp_path / "onnx"
    shutil.copytree(onnx_dir, d)
    meta = json.loads((d / "runtime.json").read_text())
    meta["item_ids"] = [str(1000 + i) for i in range(N_ITEMS)]
    (d / "runtime.json").write_text(json.dumps(meta))
    table = load_table(d / "items")  # two-part serving reads its ids from the item table
    write_table(d / "items", meta["item_ids"], {k: np.asarray(a) for k, a in table.arrays.items()},
                model_id=table.meta["model_id"])
    c = TestClient(create_app(d))
    a = c.post("/recommend", json={"history": [1001, 1002], "k": 4}).json()
    b = c.post("/recommend", json={"history": ["1001", "1002"], "k": 4}).json()
    assert a == b and len(a["items"]) == 4 and all(isinstance(x["id"], str) for x in a["items"])


def test_recommend_batch_equals_runtime(client, rec):
    hs = [["m101", "m102"], ["m110", "m111", "m112", "m113", "m114"], ["m139"]]
    body = {"histories": hs, "ratings": [[5, 4], None, [1]], "k": 4, "exclude": [None, ["m120"], []]}
    r = client.post("/recommend/batch", json=body)
    assert r.status_code == 200, r.text
    want = rec.recommend_batch(hs, ratings=[[5, 4], None, [1]], k=4, exclude=[None, ["m120"], []])
    assert r.json()["results"] == [{"items": _items(w)} for w in want]
    assert r.json()["provider"] == rec.providers[0]


def test_score_equals_runtime(client, rec):
    hist, cands = ["m101", "m120", "m133"], ["m101", "m107", "m139"]
    r = client.post("/score", json={"history": hist, "candidates": cands, "ratings": [4, 5, 2]})
    assert r.status_code == 200, r.text
    out, want = r.json(), rec.score(hist, cands, ratings=[4, 5, 2])
    assert out["candidates"] == cands
    for key in ("rating", "like", "like_logit"):
        assert out[key] == [float(x) for x in want[key]]
    assert 0 < min(out["like"]) and max(out["like"]) < 1

    rb = client.post("/score/batch", json={"histories": [hist, ["m102"]], "candidates": [cands, ["m103"]],
                                           "ratings": [[4, 5, 2], None]})
    assert rb.status_code == 200, rb.text
    want_b = rec.score_batch([hist, ["m102"]], [cands, ["m103"]], ratings=[[4, 5, 2], None])
    got_b = rb.json()["results"]
    assert [g["candidates"] for g in got_b] == [cands, ["m103"]]
    for g, w in zip(got_b, want_b):
        assert g["rating"] == [float(x) for x in w["rating"]] and g["like"] == [float(x) for x in w["like"]]


def test_drop_and_popularity_options(onnx_dir):
    c = TestClient(create_app(onnx_dir, unknown_items="drop", empty_history="popularity"))
    ref = Recommender(onnx_dir, unknown_items="drop", empty_history="popularity")
    a = c.post("/recommend", json={"history": ["m101", "nope", "m102"], "ratings": [5, 1, 3], "k": 5})
    assert a.status_code == 200 and a.json()["items"] == _items(ref.recommend(["m101", "m102"], [5, 3], k=5))
    e = c.post("/recommend", json={"history": [], "k": 5})
    assert e.status_code == 200
    top = [ITEM_IDS[i] for i in np.argsort(-np.array(POPULARITY), kind="stable")][:5]
    assert [x["id"] for x in e.json()["items"]] == top
    m = c.get("/metadata").json()
    assert m["unknown_items"] == "drop" and m["empty_history"] == "popularity"


# ------------------------------------------------------------------------------------------------ errors
BAD = [
    # (path, body (dict or raw JSON text), status, substring of "detail")
    ("/recommend", {"history": ["m101", "nope", "m102"]}, 400, "unknown item id(s) in history: 'nope'"),
    ("/recommend", {"history": []}, 400, "empty history"),
    ("/recommend", '{"history": ["m101", "m102"], "ratings": [5, NaN]}', 400, "NaN"),
    ("/recommend", '{"history": ["m101", "m102"], "ratings": [5, Infinity]}', 400, "NaN/inf"),
    ("/recommend", {"history": ["m101", "m102"], "ratings": [5, 7]}, 400, "[1, 5]"),
    ("/recommend", {"history": ["m101", "m102"], "ratings": [5]}, 400, "1 ratings for 2 history items"),
    ("/recommend", {"history": ["m101"], "k": 0}, 400, "k must be a positive int"),
    ("/recommend", {"history": ["m101"], "k": -3}, 400, "k must be a positive int"),
    ("/recommend", {"history": ["m101"], "k": N_ITEMS + 1}, 400, f"k={N_ITEMS + 1} exceeds the limit of {N_ITEMS}"),
    ("/recommend", {"history": ["m101"], "k": 100000}, 400, f"the catalog has {N_ITEMS} items"),
    ("/recommend/batch", {"histories": [["m101"]], "k": N_ITEMS + 1}, 400, f"exceeds the limit of {N_ITEMS}"),
    ("/recommend", {"history": ["m101"], "k": "3"}, 422, "k: Input should be a valid integer"),
    ("/recommend", {"history": ["m101"], "k": 2.5}, 422, "k: Input should be a valid integer"),
    ("/recommend", {"history": "m101"}, 422, "history: Input should be a valid list"),
    ("/recommend", {"history": [1.5]}, 422, "history[0]"),
    ("/recommend", {"history": [True]}, 422, "history[0]"),
    ("/recommend", '{"history": [NaN]}', 422, "history[0]"),  # a NaN echoed back must not crash the encoder
    ("/recommend", {"history": ["m101"], "ratings": ["5"]}, 422, "ratings[0]"),
    ("/recommend", {"history": ["m101"], "ratings": [None]}, 422, "ratings[0]"),
    ("/recommend", {"history": ["m101"], "exclude_seen": "no"}, 422, "exclude_seen"),
    ("/recommend", {"history": ["m101"], "user": 3}, 422, "user: Extra inputs are not permitted"),
    ("/recommend", {}, 422, "history: Field required"),
    ("/recommend", "{not json", 422, "not valid JSON"),
    ("/recommend", "[1, 2]", 422, "invalid request"),
    ("/recommend/batch", {"histories": []}, 400, "histories is empty"),
    ("/recommend/batch", {"histories": [["m101"], ["m102"]], "ratings": [[5]]}, 400, "1 rating lists for 2"),
    ("/recommend/batch", {"histories": [["m101"], ["zzz"]]}, 400, "history[1]: 'zzz'"),
    ("/recommend/batch", {"histories": [["m101"]], "exclude": [["m1"], ["m2"]]}, 400, "one id list per history"),
    ("/recommend/batch", {"histories": ["m101"]}, 422, "histories[0]: Input should be a valid list"),
    ("/score", {"history": ["m101"], "candidates": ["m102", "zzz"]}, 400, "in candidates: 'zzz'"),
    ("/score", {"history": ["m101"], "candidates": []}, 400, "candidates is empty"),
    ("/score", {"history": [], "candidates": ["m102"]}, 400, "empty history"),
    ("/score", {"history": ["m101"]}, 422, "candidates: Field required"),
    ("/score/batch", {"histories": [["m101"]], "candidates": [["m1"], ["m2"]]}, 400, "one id list per history"),
]


@pytest.mark.parametrize("which", ["client", "batched_client"])
@pytest.mark.parametrize("path,body,status,match", BAD, ids=[f"{b[0]}:{b[3][:30]}" for b in BAD])
def test_bad_input_is_a_json_4xx_naming_the_problem(request, path, body, status, match, which):
    client = request.getfixturevalue(which)
    if isinstance(body, str):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and match in detail, detail
    if status == 422:
        assert r.json()["errors"] and detail.startswith("invalid request")


def test_batch_limit_and_missing_heads(tmp_path, onnx_dir, rec):
    c = TestClient(create_app(rec, max_batch=2))
    r = c.post("/recommend/batch", json={"histories": [["m101"]] * 3})
    assert r.status_code == 400 and "at most max_batch=2" in r.json()["detail"]
    r = c.post("/score/batch", json={"histories": [["m101"]] * 3, "candidates": [["m102"]] * 3})
    assert r.status_code == 400 and "at most max_batch=2" in r.json()["detail"]
    # a model without rating/like heads (a dataset without ratings): /score is a 400 that says so
    d = tmp_path / "onnx"
    shutil.copytree(onnx_dir, d)
    meta = json.loads((d / "runtime.json").read_text())
    (d / "runtime.json").write_text(json.dumps({**meta, "tasks": ["next_item"]}))
    c2 = TestClient(create_app(d))
    r = c2.post("/score", json={"history": ["m101"], "candidates": ["m102"]})
    assert r.status_code == 400 and "no rating/like head" in r.json()["detail"]
    assert c2.post("/recommend", json={"history": ["m101"]}).status_code == 200


def test_broken_folder_fails_before_serving(tmp_path, onnx_dir):
    with pytest.raises(RuntimeArtifactError, match="distillrec export"):
        create_app(tmp_path / "nothing-here")
    d = tmp_path / "onnx"
    shutil.copytree(onnx_dir, d)
    (d / "encoder.onnx").write_bytes(b"garbage" * 10)  # the served graph of two-part serving
    with pytest.raises(RuntimeArtifactError, match="cannot be loaded"):
        create_app(d)
    with pytest.raises(ValueError, match="max_batch"):
        create_app(onnx_dir, max_batch=0)


def _broken(rec, exc: Exception) -> Recommender:
    """The same loaded model, with a session that raises `exc` at run time."""
    class Broken(Recommender):
        def predict_arrays(self, *a, **k):
            raise exc

        def _encode(self, *a, **k):  # the two-part path's session call
            raise exc

    broken = object.__new__(Broken)
    broken.__dict__.update(rec.__dict__)
    return broken


def test_a_failing_session_is_503_on_health_and_a_generic_500_elsewhere(rec, caplog):
    c = TestClient(create_app(_broken(rec, RuntimeError("CUDA error: device lost at 0xdeadbeef"))),
                   raise_server_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="distillrec.service"):
        h = c.get("/health")
        r = c.post("/recommend", json={"history": ["m101"]}, headers={"x-request-id": "req-42"})
    assert h.status_code == 503 and h.json()["status"] == "error"
    assert "device lost" not in h.text and "request_id" in h.json()["detail"]
    # a server fault: a generic body with the request id; the exception text is in the log, not the answer
    assert r.status_code == 500 and r.json() == {"detail": "internal error", "request_id": "req-42"}
    assert r.headers["x-request-id"] == "req-42"
    assert "deadbeef" not in r.text and "RuntimeError" not in r.text
    logged = [rec_.getMessage() for rec_ in caplog.records if rec_.name == "distillrec.service"]
    assert any("req-42" in m and "device lost at 0xdeadbeef" in m for m in logged), logged
    assert any("health" in m and "device lost" in m for m in logged), logged
    # a request id the caller did not send (or a malformed one) is generated
    r2 = c.post("/recommend", json={"history": ["m101"]}, headers={"x-request-id": "bad id\n"})
    assert r2.status_code == 500 and len(r2.json()["request_id"]) == 16 and r2.json()["request_id"] != "bad id\n"
    assert c.post("/recommend", json={"history": ["nope"]}).status_code == 400  # input checks still come first


def test_a_plain_value_error_is_a_500_not_a_400(rec):
    """Only the runtime's RequestError is the client's fault; a ValueError from anywhere else is a bug."""
    c = TestClient(create_app(_broken(rec, ValueError("shapes (1,3) and (4,) not aligned"))),
                   raise_server_exceptions=False)
    r = c.post("/recommend", json={"history": ["m101"]})
    assert r.status_code == 500 and r.json()["detail"] == "internal error" and "aligned" not in r.text


def test_ratings_for_a_model_without_ratings_are_rejected(tmp_path, onnx_dir):
    """A click-only model (runtime.json uses_ratings false) never saw a rating: ratings would only distort it."""
    d = tmp_path / "onnx"
    shutil.copytree(onnx_dir, d)
    meta = json.loads((d / "runtime.json").read_text())
    (d / "runtime.json").write_text(json.dumps({**meta, "uses_ratings": False}))
    c = TestClient(create_app(d))
    assert c.get("/metadata").json()["uses_ratings"] is False
    r = c.post("/recommend", json={"history": ["m101", "m102"], "ratings": [5, 1]})
    assert r.status_code == 400 and r.json()["detail"].startswith("ratings: this model does not use ratings")
    rb = c.post("/recommend/batch", json={"histories": [["m101"], ["m102"]], "ratings": [None, [4]]})
    assert rb.status_code == 400 and rb.json()["detail"].startswith("ratings[1]:")
    rs = c.post("/score", json={"history": ["m101"], "candidates": ["m102"], "ratings": [3]})
    assert rs.status_code == 400 and "ratings" in rs.json()["detail"]
    # no ratings, or all unknown (0), is what the model was trained on
    plain = c.post("/recommend", json={"history": ["m101", "m102"]}).json()["items"]
    assert c.post("/recommend", json={"history": ["m101", "m102"], "ratings": [0, 0]}).json()["items"] == plain
    # the same folder with ratings in use accepts them
    assert TestClient(create_app(onnx_dir)).get("/metadata").json()["uses_ratings"] is True


def test_k_limit_follows_max_k_and_the_catalog(rec):
    c = TestClient(create_app(rec, max_k=5))
    assert c.get("/metadata").json()["max_k"] == 5
    r = c.post("/recommend", json={"history": ["m101"], "k": 6})
    assert r.status_code == 400 and "exceeds the limit of 5" in r.json()["detail"] and "max_k is 5" in r.json()["detail"]
    assert len(c.post("/recommend", json={"history": ["m101"], "k": 5}).json()["items"]) == 5
    assert TestClient(create_app(rec)).get("/metadata").json()["max_k"] == min(DEFAULT_MAX_K, N_ITEMS)
    with pytest.raises(ValueError, match="max_k"):
        create_app(rec, max_k=0)


def test_a_history_covering_the_catalog_is_answered_with_a_note(client):
    everything = client.post("/recommend", json={"history": ITEM_IDS, "k": 5})
    assert everything.status_code == 200
    body = everything.json()
    assert body["items"] == [] and "no items left" in body["note"] and f"all {N_ITEMS}" in body["note"]
    # seen + excluded leave 2 of the catalog: both come back, with a note saying why not k
    part = client.post("/recommend", json={"history": ITEM_IDS[:37], "exclude": [ITEM_IDS[37]], "k": 5}).json()
    assert [x["id"] for x in part["items"]] and {x["id"] for x in part["items"]} == set(ITEM_IDS[38:])
    assert "only 2 of the requested k=5" in part["note"]
    batch = client.post("/recommend/batch", json={"histories": [ITEM_IDS, ["m101"]], "k": 3}).json()["results"]
    assert batch[0]["items"] == [] and "note" in batch[0]
    assert len(batch[1]["items"]) == 3 and "note" not in batch[1]


def test_score_of_an_empty_history_comes_from_popularity(onnx_dir):
    c = TestClient(create_app(onnx_dir, empty_history="popularity"))
    r = c.post("/score", json={"history": [], "candidates": ["m101", "m107"]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["source"] == "popularity" and out["popularity"] == [float(POPULARITY[1]), float(POPULARITY[7])]
    assert "rating" not in out and "like" not in out  # no model estimate was made
    rb = c.post("/score/batch", json={"histories": [[], ["m102"]], "candidates": [["m101"], ["m103"]]}).json()
    assert [x["source"] for x in rb["results"]] == ["popularity", "model"] and "rating" in rb["results"][1]


# ------------------------------------------------------------------------------------------------ processes
def test_service_imports_without_torch(onnx_dir):
    code = (
        "import sys\n"
        "sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from fastapi.testclient import TestClient\n"
        "from export.service import create_app\n"
        f"c = TestClient(create_app({str(onnx_dir)!r}))\n"
        "assert c.get('/health').json()['status'] == 'ok'\n"
        "assert c.post('/recommend', json={'history': ['m101'], 'k': 2}).status_code == 200\n"
        "assert not [m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in ('torch', 'distill')]\n"
        "print('OK')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "OK" in p.stdout


def test_workers_get_their_settings_without_touching_os_environ(onnx_dir, free_port, monkeypatch):
    """serve(workers=N) hands each worker a picklable app factory; the parent's environment is left as it was."""
    import uvicorn.supervisors

    from export import service

    started = {}

    class FakeSupervisor:  # records what uvicorn's Multiprocess would start, starts nothing
        def __init__(self, config, sockets):
            started.update(config=config, sockets=sockets)

        def run(self):
            started["ran"] = True

    monkeypatch.setattr(uvicorn.supervisors, "Multiprocess", FakeSupervisor)
    env_before = dict(os.environ)
    service.serve(onnx_dir, port=free_port, workers=3, empty_history="popularity", max_k=7, log_level="warning")
    assert dict(os.environ) == env_before
    config = started["config"]
    assert started["ran"] and config.workers == 3 and config.factory is True and config.port == free_port
    # the fast event loop / HTTP parser when installed, no access log by default
    assert config.access_log is False
    assert config.loop == ("uvloop" if importlib.util.find_spec("uvloop") else "asyncio")
    assert config.http == ("httptools" if importlib.util.find_spec("httptools") else "h11")
    # what a spawned worker receives: the factory survives pickling and builds the app from its arguments
    factory = pickle.loads(pickle.dumps(config.app))
    settings = factory.args[0]
    assert isinstance(settings, ServiceSettings) and settings.folder == str(Path(onnx_dir).resolve())
    assert settings.intra_op_threads == default_intra_op_threads(3)  # the cores are split between the workers
    app = factory()
    rec = app.state.recommender
    assert rec.empty_history == "popularity" and rec.intra_op_threads == settings.intra_op_threads
    assert TestClient(app).get("/metadata").json()["max_k"] == 7
    assert build_app(ServiceSettings(folder=str(onnx_dir))).state.recommender.intra_op_threads == \
        default_intra_op_threads()


@pytest.mark.parametrize("workers", [1, 2])
def test_real_uvicorn_server(onnx_dir, rec, free_port, workers):
    port = free_port
    code = f"from export.service import serve; serve({str(onnx_dir)!r}, host='127.0.0.1', port={port}, " \
           f"workers={workers}, log_level='warning')"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, up = time.monotonic() + 45, False
        with httpx.Client(base_url=base, timeout=5.0) as http:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                try:
                    up = http.get("/health").status_code == 200
                except httpx.TransportError:
                    up = False
                if up:
                    break
                time.sleep(0.2)
            assert up, f"server did not come up (exit {proc.poll()})"
            assert http.get("/health").json()["provider"] == "CPUExecutionProvider"
            # concurrent requests against the one shared session give the serial answers
            hs = [[ITEM_IDS[(7 * j + t) % N_ITEMS] for t in range(1 + j % 6)] for j in range(16)]
            with ThreadPoolExecutor(8) as pool:
                got = list(pool.map(lambda h: http.post("/recommend", json={"history": h, "k": 5}), hs))
            assert all(g.status_code == 200 for g in got)
            for g, h in zip(got, hs):  # micro-batched: equal up to float32 rounding (see _assert_same_answer)
                _assert_same_answer(g.json()["items"], rec.recommend(h, k=5))
            bad = http.post("/recommend", json={"history": ["nope"]})
            assert bad.status_code == 400 and "'nope'" in bad.json()["detail"]
            assert http.post("/score", json={"history": ["m101"], "candidates": ["m102"]}).status_code == 200
    finally:
        proc.terminate()
        killed = False
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            killed = True
            proc.kill()
            proc.wait(timeout=5)
    log = proc.stdout.read() if proc.stdout else ""
    # SIGTERM shuts the server down by itself (graceful shutdown, then uvicorn re-raises the signal it caught):
    # a server that hangs on SIGTERM, crashes while stopping, or prints a traceback fails here
    assert not killed, f"the server ignored SIGTERM for 20 s: {log[-2000:]}"
    assert proc.returncode in (0, -signal.SIGTERM), (proc.returncode, log[-2000:])
    assert "Traceback" not in log, log[-2000:]


def test_scores_are_json_safe():
    from export.service import _finite, _safe
    assert _finite(np.float32(1.5)) == 1.5 and _finite(float("nan")) is None and _finite(-math.inf) is None
    assert _safe({"input": [float("nan"), 1.0], "ctx": {"error": ValueError("x")}}) == \
        {"input": ["nan", 1.0], "ctx": {"error": "x"}}
