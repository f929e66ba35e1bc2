"""Micro-batching service (export/batching.py + export/service.py): batched answers equal batch-1 answers for rows
that differ in k / exclude / exclude_seen / allow, a bad row fails alone, a full queue answers 503 + Retry-After
(bounded, no crash, the service still answers), /ready follows the lifespan, /metrics is valid Prometheus text
whose counts match the requests sent, and a new item table version on disk is reloaded exactly once.

Batches are formed deterministically: a gated wrapper holds the worker inside its first session call until the
test has queued what it wants, so no assertion depends on timing. The tiny exported student (40 items) is
conftest's `serving_export`.
"""
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from export.batching import (BatcherClosed, MicroBatcher, Overloaded, RecommendJob, TableWatcher, recommend_rows,
                             supports_allow)
from export.runtime import Recommender, RequestError
from export.service import ServiceSettings, _dumps, create_app

WAIT_S = 30  # upper bound of every wait for a condition (a hung test fails instead of blocking the suite)


@pytest.fixture(scope="module")
def rec(serving_export):
    return Recommender(serving_export.onnx_dir)


@pytest.fixture(scope="module")
def ids(serving_export):
    return list(serving_export.item_ids)


# ------------------------------------------------------------------------------------------------ stubs
class Wrap:
    """The real Recommender behind a wrapper that records the rows of each recommend_batch call; while `hold` is
    cleared, a call waits inside (after setting `entered`) until the test sets it again."""

    def __init__(self, rec, sleep_s: float = 0.0):
        self._rec, self.sleep_s = rec, sleep_s
        self.calls: list[int] = []
        self.hold, self.entered = threading.Event(), threading.Event()
        self.hold.set()

    def __getattr__(self, name):
        return getattr(self._rec, name)

    def recommend_batch(self, histories, **kw):
        self.calls.append(len(histories))
        self.entered.set()
        assert self.hold.wait(WAIT_S), "the test never released the gate"
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return self._rec.recommend_batch(histories, **kw)


class NativeAllow(Wrap):
    """A runtime whose recommend_batch takes `allow` itself (the lead's new API): records what it was given."""

    def __init__(self, rec):
        super().__init__(rec)
        self.allow_args = []

    def recommend_batch(self, histories, ratings=None, k=None, exclude_seen=True, exclude=None, allow=None):
        self.allow_args.append(allow)
        if allow is not None:  # emulate: everything outside allow is excluded
            exclude = list(exclude) if exclude is not None else [None] * len(histories)
            exclude = [(ex or []) + ([i for i in self._rec.item_ids if i not in {str(a) for a in al}]
                                     if al is not None else []) for ex, al in zip(exclude, allow)]
        return super().recommend_batch(histories, ratings=ratings, k=k, exclude_seen=exclude_seen, exclude=exclude)


class Versioned(Wrap):
    """A runtime with an item table: `disk` is the version on disk, reload() swaps to it."""

    def __init__(self, rec):
        super().__init__(rec)
        self.table_version, self.disk, self.reload_calls, self.disk_reads = 0, 0, 0, 0

    def disk_table_version(self):
        self.disk_reads += 1
        return self.disk

    def reload(self):
        self.reload_calls += 1
        changed = self.disk != self.table_version
        self.table_version = self.disk
        return changed


def wait_for(cond, what: str):
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def same_answer(got: list, want: list) -> None:
    """Same ids in the same order; scores equal up to float32 rounding (a row padded to another history length)."""
    assert [i for i, _ in got] == [i for i, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-5, atol=1e-5)


def mixed_jobs(ids) -> list[RecommendJob]:
    """Rows that differ in everything a /recommend request may set."""
    return [
        RecommendJob(history=[ids[1], ids[2], ids[3]], k=5),
        RecommendJob(history=[ids[4]], ratings=[5], k=12, exclude=[ids[0], "not-in-catalog"]),
        RecommendJob(history=[ids[5], ids[6]], k=3, exclude_seen=False),
        RecommendJob(history=ids[:25], ratings=[4] * 25, k=7),  # longer than max_history
        RecommendJob(history=[ids[7], ids[8]], k=4, allow=[ids[7], ids[9], ids[10], ids[11], "zzz"]),
        RecommendJob(history=[ids[9]], k=40, exclude_seen=False, exclude=[ids[9]]),
        RecommendJob(history=[ids[30], ids[31]], k=1, allow=[ids[30], ids[31]], exclude_seen=False),
    ]


def alone(rec, j: RecommendJob) -> list:
    """The batch-1 answer through the public Recommender API (allow emulated as its complement in exclude)."""
    exclude = list(j.exclude or [])
    if j.allow is not None:
        exclude += [i for i in rec.item_ids if i not in {str(a) for a in j.allow}]
    return rec.recommend(j.history, ratings=j.ratings, k=j.k, exclude_seen=j.exclude_seen,
                         exclude=exclude if (j.exclude is not None or j.allow is not None) else None)


def run_gated(stub, batcher, jobs):
    """Hold the worker in a first call, queue `jobs`, release: they are answered as ONE batch."""
    stub.hold.clear()
    first = batcher.submit(RecommendJob(history=[stub.item_ids[0]], k=2))
    wait_for(stub.entered.is_set, "the worker to enter its first call")
    futures = [batcher.submit(j) for j in jobs]
    stub.hold.set()
    first.result(WAIT_S)
    out = []
    for f in futures:
        try:
            out.append(f.result(WAIT_S))
        except Exception as e:  # noqa: BLE001 - the caller checks which rows failed
            out.append(e)
    return out


# ------------------------------------------------------------------------------------------------ the batcher
def test_one_batch_answers_rows_that_differ_in_k_exclude_seen_and_allow(rec, ids):
    stub = Wrap(rec)
    b = MicroBatcher(stub, max_queue=64, max_batch=64).start()
    try:
        jobs = mixed_jobs(ids)
        got = run_gated(stub, b, jobs)
    finally:
        b.close()
    assert stub.calls == [1, len(jobs)]  # the gate call, then every job in one session call
    for j, g in zip(jobs, got):
        assert len(g) == min(j.k, len(alone(rec, j))) and len(g) <= j.k
        same_answer(g, alone(rec, j))
    assert {i for i, _ in got[4]} <= {ids[9], ids[10], ids[11]}  # allow minus the seen ids
    assert len(got[6]) == 1 and got[6][0][0] in (ids[30], ids[31])


def test_recommend_rows_matches_the_runtime_exactly_for_one_row(rec, ids):
    for j in mixed_jobs(ids):
        same_answer(recommend_rows(rec, [j])[0], alone(rec, j))


def test_a_bad_row_fails_alone(rec, ids):
    stub = Wrap(rec)
    b = MicroBatcher(stub, max_queue=64, max_batch=64, request_error=RequestError).start()
    try:
        jobs = [RecommendJob(history=[ids[1]], k=3), RecommendJob(history=[ids[2], "nope"], k=3),
                RecommendJob(history=[ids[3]], ratings=[9], k=3), RecommendJob(history=[ids[4]], k=2)]
        got = run_gated(stub, b, jobs)
    finally:
        b.close()
    assert isinstance(got[1], RequestError) and "unknown item id(s) in history: 'nope'" in str(got[1])
    assert isinstance(got[2], RequestError) and "[1, 5]" in str(got[2])
    same_answer(got[0], rec.recommend([ids[1]], k=3))
    same_answer(got[3], rec.recommend([ids[4]], k=2))


def test_a_server_fault_fails_the_batch_without_killing_the_worker(rec, ids):
    class Boom(Wrap):
        def recommend_batch(self, histories, **kw):
            if any("boom" in h for h in histories):
                raise RuntimeError("session died")
            return super().recommend_batch(histories, **kw)

    b = MicroBatcher(Boom(rec)).start()
    try:
        with pytest.raises(RuntimeError, match="session died"):
            b.submit(RecommendJob(history=["boom"], k=2)).result(WAIT_S)
        same_answer(b.submit(RecommendJob(history=[ids[1]], k=2)).result(WAIT_S), rec.recommend([ids[1]], k=2))
    finally:
        b.close()


def test_full_queue_is_overloaded_with_retry_after_and_bounded(rec, ids):
    stub = Wrap(rec)
    b = MicroBatcher(stub, max_queue=2, max_batch=8).start()
    try:
        stub.hold.clear()
        first = b.submit(RecommendJob(history=[ids[1]], k=2))
        wait_for(stub.entered.is_set, "the worker to enter its call")
        queued = [b.submit(RecommendJob(history=[ids[2]], k=2)) for _ in range(2)]
        for _ in range(50):
            with pytest.raises(Overloaded) as e:
                b.submit(RecommendJob(history=[ids[3]], k=2))
            assert isinstance(e.value.retry_after, int) and e.value.retry_after >= 1
            assert "max_queue=2" in str(e.value)
        assert b.depth == 2 and b.peak_depth == 2
        stub.hold.set()
        assert first.result(WAIT_S) and all(f.result(WAIT_S) for f in queued)
        assert b.submit(RecommendJob(history=[ids[4]], k=2)).result(WAIT_S)  # it recovers
    finally:
        b.close()


def test_retry_after_follows_queue_depth_over_throughput(rec):
    b = MicroBatcher(rec, max_queue=1000)
    assert b.retry_after() == 1  # no throughput measured yet
    b._rows_per_s = 100.0
    for _ in range(450):
        b._q.put_nowait(RecommendJob(history=["x"]))
    assert b.retry_after() == 5  # ceil(450 / 100)
    b._rows_per_s = 1.0
    assert b.retry_after() == 60  # capped


def test_close_drains_the_queue_then_refuses(rec, ids):
    stub = Wrap(rec)
    b = MicroBatcher(stub).start()
    stub.hold.clear()
    first = b.submit(RecommendJob(history=[ids[1]], k=2))
    wait_for(stub.entered.is_set, "the worker to enter its call")
    queued = [b.submit(RecommendJob(history=[ids[i]], k=2)) for i in range(2, 6)]
    closer = threading.Thread(target=b.close)
    closer.start()
    wait_for(lambda: not b.running, "close() to start")
    with pytest.raises(BatcherClosed):
        b.submit(RecommendJob(history=[ids[1]], k=2))
    stub.hold.set()
    closer.join(WAIT_S)
    assert not closer.is_alive() and not b._thread.is_alive()
    assert first.result(0)
    for f, i in zip(queued, range(2, 6)):
        same_answer(f.result(0), rec.recommend([ids[i]], k=2))


def test_allow_is_passed_to_a_runtime_that_takes_it(rec, ids):
    stub = NativeAllow(rec)
    assert supports_allow(stub) and not supports_allow(Wrap(rec))
    j = RecommendJob(history=[ids[1]], k=3, allow=[ids[5], ids[6], ids[7], ids[8]])
    got = recommend_rows(stub, [j, RecommendJob(history=[ids[2]], k=3)])
    assert stub.allow_args == [[j.allow, None]]
    same_answer(got[0], alone(rec, j))
    assert {i for i, _ in got[0]} <= set(j.allow)
    recommend_rows(stub, [RecommendJob(history=[ids[2]], k=3)])
    assert stub.allow_args[-1] is None  # no row restricted: allow is not passed at all


def test_table_watcher_checks_at_most_every_check_s_and_reloads_once(rec):
    now = [100.0]
    stub = Versioned(rec)
    w = TableWatcher(stub, check_s=1.0, clock=lambda: now[0])
    assert w.enabled and w.table_version == 0
    assert not w.maybe_reload() and stub.disk_reads == 1
    assert not w.maybe_reload() and stub.disk_reads == 1  # not due yet
    stub.disk = 3
    now[0] += 1.0
    assert w.maybe_reload() and w.reloads == 1 and w.table_version == 3
    for _ in range(5):
        now[0] += 1.0
        assert not w.maybe_reload()
    assert stub.reload_calls == 1 and stub.disk_reads == 7
    # the real runtime: a model without an item table (or a runtime without reload) reports version 0
    assert TableWatcher(rec).table_version == getattr(rec, "table_version", 0)
    assert TableWatcher(rec, check_s=None).enabled is False


# ------------------------------------------------------------------------------------------------ HTTP
def _post_all(c, bodies, workers=16):
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda b: c.post("/recommend", json=b), bodies))


def test_http_batched_answers_equal_batch_1_and_metrics_show_batches(rec, ids):
    stub = Wrap(rec)
    app = create_app(stub, batch_max=64, max_queue=64)
    bodies = [{"history": [ids[1], ids[2]], "k": 5}, {"history": [ids[3]], "k": 2, "exclude": [ids[0]]},
              {"history": [ids[4], ids[5]], "k": 9, "exclude_seen": False},
              {"history": [ids[6]], "ratings": [5], "k": 4, "allow": [ids[7], ids[8], ids[9]]},
              {"history": ids[:20], "k": 6}] * 3
    with TestClient(app) as c:
        stub.hold.clear()
        with ThreadPoolExecutor(1) as gate_pool:
            first = gate_pool.submit(c.post, "/recommend", json={"history": [ids[1]], "k": 1})
            wait_for(stub.entered.is_set, "the first request to reach the worker")
            with ThreadPoolExecutor(len(bodies)) as pool:
                futs = [pool.submit(c.post, "/recommend", json=b) for b in bodies]
                wait_for(lambda: app.state.handlers.batcher.depth == len(bodies), "every request to queue")
                stub.hold.set()
                got = [f.result(WAIT_S) for f in futs]
            assert first.result(WAIT_S).status_code == 200
        metrics = parse_metrics(c.get("/metrics").text)
    assert stub.calls == [1, len(bodies)]
    for r, b in zip(got, bodies):
        assert r.status_code == 200, r.text
        j = RecommendJob(history=b["history"], ratings=b.get("ratings"), k=b["k"], exclude=b.get("exclude"),
                         exclude_seen=b.get("exclude_seen", True), allow=b.get("allow"))
        same_answer([(x["id"], x["score"]) for x in r.json()["items"]], alone(rec, j))
    sizes = {s["labels"]["le"]: s["value"] for s in metrics["distillrec_batch_size_bucket"]}
    assert sizes["1"] == 1 and sizes["+Inf"] == 2  # two session calls: the gate's (1 row) and all the rest
    assert metrics["distillrec_batch_size_sum"][0]["value"] == 1 + len(bodies)


def test_http_one_bad_request_in_a_batch_gets_its_400(rec, ids):
    stub = Wrap(rec)
    app = create_app(stub)
    bodies = [{"history": [ids[1]], "k": 3}, {"history": [ids[2], "nope"]}, {"history": [ids[3]], "k": 2},
              {"history": [ids[4]], "ratings": [7]}]
    with TestClient(app) as c:
        stub.hold.clear()
        with ThreadPoolExecutor(1) as gate_pool:
            first = gate_pool.submit(c.post, "/recommend", json={"history": [ids[1]], "k": 1})
            wait_for(stub.entered.is_set, "the first request to reach the worker")
            with ThreadPoolExecutor(len(bodies)) as pool:
                futs = [pool.submit(c.post, "/recommend", json=b) for b in bodies]
                wait_for(lambda: app.state.handlers.batcher.depth == len(bodies), "every request to queue")
                stub.hold.set()
                got = [f.result(WAIT_S) for f in futs]
            first.result(WAIT_S)
    assert [r.status_code for r in got] == [200, 400, 200, 400]
    assert "unknown item id(s) in history: 'nope'" in got[1].json()["detail"]
    assert "[1, 5]" in got[3].json()["detail"]
    same_answer([(x["id"], x["score"]) for x in got[0].json()["items"]], rec.recommend([ids[1]], k=3))
    assert stub.calls[1] == len(bodies)  # they were one batch (then re-run one by one)


def test_http_overload_is_503_with_retry_after_and_the_service_recovers(rec, ids):
    stub = Wrap(rec, sleep_s=0.001)  # a slow recommender: every call sleeps (and the first waits at the gate)
    app = create_app(stub, max_queue=2, batch_max=4)
    n_extra = 12
    with TestClient(app) as c:
        stub.hold.clear()
        with ThreadPoolExecutor(1) as gate_pool:
            first = gate_pool.submit(c.post, "/recommend", json={"history": [ids[1]], "k": 1})
            wait_for(stub.entered.is_set, "the first request to reach the worker")
            with ThreadPoolExecutor(n_extra) as pool:
                futs = [pool.submit(c.post, "/recommend", json={"history": [ids[2 + i]], "k": 2})
                        for i in range(n_extra)]
                wait_for(lambda: app.state.metrics.rejected == n_extra - 2, "the overflow to be rejected")
                stub.hold.set()
                got = [f.result(WAIT_S) for f in futs]
            assert first.result(WAIT_S).status_code == 200
        codes = sorted(r.status_code for r in got)
        assert codes == [200] * 2 + [503] * (n_extra - 2)
        for r in got:
            if r.status_code == 503:
                assert re.fullmatch(r"[1-9][0-9]*", r.headers["retry-after"])
                body = r.json()
                assert "overloaded" in body["detail"] and body["max_queue"] == 2 and body["retry_after"] >= 1
        assert app.state.handlers.batcher.peak_depth <= 2  # memory bounded by the queue, not by the load
        # still serving, and the metrics say what happened
        assert all(r.status_code == 200 for r in _post_all(c, [{"history": [ids[5]], "k": 2}] * 4, workers=2))
        m = parse_metrics(c.get("/metrics").text)
    assert m["distillrec_rejected_total"][0]["value"] == n_extra - 2
    assert counts(m, "/recommend") == {200: 2 + 1 + 4, 503: n_extra - 2}
    assert m["distillrec_queue_capacity"][0]["value"] == 2


def test_ready_follows_the_lifespan(rec):
    app = create_app(rec)
    c = TestClient(app)
    r = c.get("/ready")
    assert r.status_code == 503 and r.json()["status"] == "starting"
    assert c.get("/health").status_code == 200  # alive, not ready
    with c:
        r = c.get("/ready")
        assert r.status_code == 200 and r.json()["status"] == "ready"
        assert r.json()["table_version"] == getattr(rec, "table_version", 0)
        assert app.state.handlers.batcher.running
        thread = app.state.handlers.batcher._thread
    assert not thread.is_alive()  # the lifespan's shutdown stopped the worker
    r = c.get("/ready")
    assert r.status_code == 503 and r.json()["status"] == "stopped"
    # batching off: ready after startup too, and /recommend still answers
    app2 = create_app(rec, batching=False)
    with TestClient(app2) as c2:
        assert c2.get("/ready").json()["batching"] is False and c2.get("/ready").status_code == 200
        assert c2.post("/recommend", json={"history": ["m101"], "k": 2}).status_code == 200


# ------------------------------------------------------------------------------------------------ metrics
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict:
    """A strict little parser of the text format 0.0.4: every line is a comment (# HELP / # TYPE) or a sample;
    -> {metric name: [{"labels": {...}, "value": float}]}. Raises AssertionError on anything else."""
    assert text.endswith("\n")
    out: dict = {}
    types: dict = {}
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(" ", 3)
            assert parts[1] in ("HELP", "TYPE") and len(parts) == 4, line
            if parts[1] == "TYPE":
                assert parts[3] in ("counter", "gauge", "histogram"), line
                types[parts[2]] = parts[3]
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels, value = m.groups()
        parsed = dict(_LABEL.findall(labels or ""))
        assert not labels or ",".join(f'{k}="{v}"' for k, v in _LABEL.findall(labels)) == labels, line
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or base in types, f"{name} has no # TYPE"
        out.setdefault(name, []).append({"labels": parsed, "value": float(value)})
    return out


def counts(m: dict, endpoint: str) -> dict:
    return {int(s["labels"]["code"]): int(s["value"]) for s in m["distillrec_requests_total"]
            if s["labels"]["endpoint"] == endpoint}


def test_metrics_parse_and_count_the_requests_sent(rec, ids):
    app = create_app(rec)
    with TestClient(app) as c:
        for i in range(7):
            assert c.post("/recommend", json={"history": [ids[i]], "k": 3}).status_code == 200
        assert c.post("/recommend", json={"history": ["nope"]}).status_code == 400
        assert c.post("/recommend", json={"history": "x"}).status_code == 422
        assert c.post("/recommend/batch", json={"histories": [[ids[1]], [ids[2]]]}).status_code == 200
        assert c.post("/score", json={"history": [ids[1]], "candidates": [ids[2]]}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/nowhere").status_code == 404
        text = c.get("/metrics").text
        m = parse_metrics(text)
        m2 = parse_metrics(c.get("/metrics").text)
    assert counts(m, "/recommend") == {200: 7, 400: 1, 422: 1}
    assert counts(m, "/recommend/batch") == {200: 1} and counts(m, "/score") == {200: 1}
    assert counts(m, "/health") == {200: 1} and counts(m, "other") == {404: 1}
    assert counts(m2, "/metrics") == {200: 1}  # the first scrape is counted in the second
    lat = {s["labels"]["le"]: s["value"] for s in m["distillrec_request_latency_seconds_bucket"]
           if s["labels"]["endpoint"] == "/recommend"}
    assert list(lat)[0] == "0.0005" and list(lat)[-2:] == ["1.0", "+Inf"] and lat["+Inf"] == 9
    assert list(lat.values()) == sorted(lat.values())  # cumulative buckets
    assert [s["value"] for s in m["distillrec_request_latency_seconds_count"]
            if s["labels"]["endpoint"] == "/recommend"] == [9]
    sizes = m["distillrec_batch_size_count"][0]["value"]
    assert sizes == 8  # the 7 answers and the 400 went through the batcher (the 422 never reached it)
    for name in ("distillrec_queue_depth", "distillrec_table_version", "distillrec_reloads_total",
                 "distillrec_rejected_total", "distillrec_ready"):
        assert len(m[name]) == 1 and "pid" in m[name][0]["labels"], name
    assert m["distillrec_ready"][0]["value"] == 1
    assert m["distillrec_table_version"][0]["value"] == getattr(rec, "table_version", 0)
    assert "# TYPE distillrec_request_latency_seconds histogram" in text


@pytest.mark.parametrize("batching", [True, False])
def test_a_new_table_version_on_disk_is_reloaded_once(rec, batching):
    stub = Versioned(rec)
    app = create_app(stub, reload_check_s=0.005, batching=batching)
    with TestClient(app) as c:
        w = app.state.handlers.watcher
        wait_for(lambda: stub.disk_reads >= 2, "the watcher to look at the disk")
        assert stub.reload_calls == 0 and parse_metrics(c.get("/metrics").text)["distillrec_reloads_total"][0][
            "value"] == 0
        stub.disk = 1
        wait_for(lambda: w.reloads == 1, "the reload")
        reads = stub.disk_reads
        wait_for(lambda: stub.disk_reads >= reads + 3, "three more looks at the disk")
        m = parse_metrics(c.get("/metrics").text)
        assert c.post("/recommend", json={"history": ["m101"], "k": 2}).status_code == 200
    assert stub.reload_calls == 1 and w.reloads == 1
    assert m["distillrec_reloads_total"][0]["value"] == 1 and m["distillrec_table_version"][0]["value"] == 1


# ------------------------------------------------------------------------------------------------ settings, JSON
@pytest.mark.parametrize("field,value,match", [
    ("max_queue", 0, "max_queue must be a positive int"),
    ("batch_max", 1.5, "batch_max must be a positive int"),
    ("batch_wait_ms", -1, r"batch_wait_ms must be a number of milliseconds in \[0, 1000\]"),
    ("reload_check_s", 0, "reload_check_s must be a positive number of seconds, or None"),
    ("batching", "yes", "batching must be True or False"),
])
def test_batching_settings_are_validated(rec, field, value, match):
    with pytest.raises(ValueError, match=match):
        ServiceSettings(folder="x", **{field: value})
    with pytest.raises(ValueError, match=match):
        create_app(rec, **{field: value})


def test_responses_are_orjson_with_numpy_and_nan():
    assert _dumps({"a": np.float32(1.5), "b": float("nan"), "c": np.int64(3), "d": [np.float64(np.inf)]}) == \
        b'{"a":1.5,"b":null,"c":3,"d":[null]}'
