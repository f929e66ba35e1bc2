"""Micro-batching of single /recommend requests, and the item-table reload watch (stdlib + numpy; no torch).

    batcher = MicroBatcher(rec, max_queue=128, max_batch=16, max_wait_ms=0.5)
    batcher.start()
    got = await batcher.recommend(RecommendJob(history=["50", "172"], k=10))   # -> [(item_id, score), ...]
    batcher.close()                                                             # drains, then the thread exits

Concurrent requests wait in ONE bounded queue (`max_queue`); ONE worker thread takes the first waiting request
plus everything else already queued (up to `max_batch`), optionally waits a little for more (`max_wait_ms`,
adaptive, see `MicroBatcher`), and answers the whole batch with a single `rec.recommend_batch` call. Each row
is then cut to its own k: a top-K list begins with the top-k of any k <= K (the runtime's `top_k_indices`
orders by score, ties by the lower index, so it is prefix-stable). Rows may differ in k, exclude, exclude_seen,
allow, query and explain (`_batch_call` merges them into one call: queries go per row; explain is computed for
the whole batch when any row asks and stripped from the rows that did not, as it never changes ids or scores).
A `RequestError` for the batch never fails the other
requests: the rows are re-run one by one and only the offending ones get the error.

A full queue is `Overloaded` (the HTTP service answers 503 with Retry-After = queued requests / recent rows
per second, at least 1 s): the queue never grows past `max_queue`, so memory stays bounded under any load.

Futures: a request awaited on an event loop gets an asyncio future, resolved from the worker thread with ONE
`loop.call_soon_threadsafe` per batch and loop (not one wake-up per row); a plain thread gets a
`concurrent.futures.Future`. The worker never runs on the event loop, so the loop keeps parsing and answering
other requests while a batch runs in onnxruntime (which releases the GIL).

`TableWatcher` polls `rec.disk_table_version()` at most every `check_s` seconds and calls `rec.reload()` when
it differs from `rec.table_version`; `WatchThread` runs it on its own thread, so a reload (loading a table,
building an ANN index) never holds up the batcher. The swap is one assignment in the runtime: a batch that took
the old catalog finishes on it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

__all__ = ["MicroBatcher", "RecommendJob", "Overloaded", "BatcherClosed", "TableWatcher", "WatchThread",
           "recommend_rows", "DEFAULT_MAX_QUEUE", "DEFAULT_BATCH_MAX", "DEFAULT_BATCH_WAIT_MS",
           "DEFAULT_RELOAD_CHECK_S"]

log = logging.getLogger("distillrec.service")

DEFAULT_MAX_QUEUE = 128
"""Requests that may wait for the worker. On the 2-core reference machine one worker answers ~2,000 rows/s, so
128 queued requests are ~60-100 ms of work: past that, an immediate 503 + Retry-After serves a client better
than a queue whose wait grows without bound (and memory stays bounded by the queue, not by the load)."""
DEFAULT_BATCH_MAX = 16
"""Most requests per session call. On CPU (the student, history 50, 1 intra-op thread) the per-row cost falls
from 0.60 ms at batch 1 to ~0.45 ms at batch 4-16 and rises again at 32 (13.6 ms for the batch): beyond ~8-16
rows a bigger batch only makes its first rows wait longer. On a GPU a larger value pays off."""
DEFAULT_BATCH_WAIT_MS = 0.5
"""How long the worker waits for more requests after taking what is already queued -- only while requests
arrive concurrently (the previous batch held more than one row), so a lone client is never delayed. With 8
closed-loop clients on the 2-core reference machine, 0.5 ms gave fewer session calls per request than 0 (server
CPU 1,081-1,310 us/request vs 1,220-1,454 us, req/s 359-371 vs 279-331, in alternating runs on a machine other
jobs kept at load ~6.6): requests still on their way when a batch closes join it instead of paying a session
call of their own. Much longer waits only add latency: one batch-8 session call takes ~3.5 ms on CPU."""
DEFAULT_RELOAD_CHECK_S = 1.0
"""Seconds between two looks at the item table's version on disk: one small-file read per second is free,
and a new table is served within about a second."""
_RETRY_AFTER_MAX_S = 60
"""Retry-After never says more than this (a stalled worker must not tell clients to go away for hours)."""


# ------------------------------------------------------------------------------------------------ errors
class Overloaded(Exception):
    """The queue is full: the request was not queued. `retry_after` (int seconds >= 1) is the advice to send."""

    def __init__(self, depth: int, max_queue: int, retry_after: int):
        self.depth, self.max_queue, self.retry_after = depth, max_queue, retry_after
        super().__init__(f"the service is overloaded: {depth} requests are already queued (max_queue="
                         f"{max_queue}); retry after {retry_after} s, or raise max_queue / add workers if this "
                         f"is the normal load")


class BatcherClosed(Exception):
    """The batcher is shutting down (or was never started): the request was not answered."""


# ------------------------------------------------------------------------------------------------ jobs
@dataclass
class RecommendJob:
    """One /recommend request, already validated for shape and types (the runtime checks ids, ratings, k).

    `k` is the k to serve (the service resolves None to the model's top_k before queueing); `allow` None or
    the only ids that may be recommended; `query` None or the text steering this row; `explain` whether each
    item comes with its supporting history items (id, score, because)."""
    history: list
    ratings: Optional[list] = None
    k: int = 10
    exclude: Optional[list] = None
    exclude_seen: bool = True
    allow: Optional[list] = None
    query: Optional[str] = None
    explain: bool = False
    # filled in by MicroBatcher.submit
    future: Any = field(default=None, repr=False)
    loop: Optional[asyncio.AbstractEventLoop] = field(default=None, repr=False)

    def abandoned(self) -> bool:
        """The caller stopped waiting (client gone, request cancelled): skip the row instead of computing it."""
        f = self.future
        return f is not None and f.cancelled()


def supports_allow(rec) -> bool:
    """Whether rec.recommend_batch takes `allow` itself (newer runtimes); otherwise the batcher emulates it."""
    try:
        return "allow" in inspect.signature(rec.recommend_batch).parameters
    except (TypeError, ValueError):  # a builtin / C callable without a signature: assume the old API
        return False


def _allow_as_exclude(rec, allow: list) -> list:
    """For a runtime without `allow`: every catalog id outside `allow` becomes an excluded id (same answer)."""
    keep = {str(x) for x in allow}
    return [i for i in rec.item_ids if i not in keep]


def _batch_call(rec, jobs: list[RecommendJob], native_allow: bool) -> tuple[list, dict]:
    """The arguments of ONE recommend_batch call answering every job: (histories, kwargs).

    k = the largest k (rows are cut afterwards). exclude_seen: passed through when every row agrees; otherwise
    False for the call and each exclude_seen row gets its own history added to its `exclude` (ids outside the
    catalog are ignored by `exclude`, exactly as unknown ids drop out of the seen set: the same answer)."""
    histories = [j.history for j in jobs]
    kw: dict[str, Any] = {"k": max(j.k for j in jobs)}
    if any(j.ratings is not None for j in jobs):
        kw["ratings"] = [j.ratings for j in jobs]
    seen_flags = {bool(j.exclude_seen) for j in jobs}
    mixed = len(seen_flags) > 1
    kw["exclude_seen"] = False if mixed else seen_flags.pop()
    exclude = []
    for j in jobs:
        ex = list(j.exclude) if j.exclude is not None else None
        if mixed and j.exclude_seen:
            ex = (ex or []) + list(j.history)
        if j.allow is not None and not native_allow:
            ex = (ex or []) + _allow_as_exclude(rec, j.allow)
        exclude.append(ex)
    if any(ex is not None for ex in exclude):
        kw["exclude"] = exclude
    if native_allow and any(j.allow is not None for j in jobs):
        kw["allow"] = [j.allow for j in jobs]
    # only when used: a runtime (or wrapper) without queries / explain keeps working for the other requests
    if any(j.query is not None for j in jobs):
        kw["queries"] = [j.query for j in jobs]
    if any(j.explain for j in jobs):
        kw["explain"] = True
    return histories, kw


def recommend_rows(rec, jobs: list[RecommendJob], native_allow: Optional[bool] = None) -> list[list]:
    """Answer `jobs` with one rec.recommend_batch call; each row cut to its own k. Raises what the runtime
    raises (a RequestError names the row only when len(jobs) > 1). Also the unbatched path (one job)."""
    if native_allow is None:
        native_allow = supports_allow(rec)
    histories, kw = _batch_call(rec, jobs, native_allow)
    got = rec.recommend_batch(histories, **kw)
    out = []
    for row, j in zip(got, jobs):
        row = list(row[:j.k])
        if kw.get("explain") and not j.explain:  # explained for a neighbour in the batch: not asked here
            row = [(item, score) for item, score, _ in row]
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------ reload
class TableWatcher:
    """Reloads the recommender's item table when its version on disk changes; checks at most every `check_s`.

    Works with any recommender: one without `disk_table_version` / `reload` (a model without an item table,
    today's runtime) is never reloaded and reports table_version 0. `reloads` counts successful swaps,
    `errors` failed looks or reloads (logged; the old table keeps serving)."""

    def __init__(self, rec, check_s: Optional[float] = DEFAULT_RELOAD_CHECK_S,
                 clock: Callable[[], float] = time.monotonic):
        self.rec, self.check_s, self.clock = rec, check_s, clock
        self.reloads = 0
        self.errors = 0
        self._failed: Optional[int] = None  # a version whose reload failed: not retried until CURRENT moves
        self._next = 0.0
        self._lock = threading.Lock()  # two callers (batcher + a probe) never reload at once

    @property
    def enabled(self) -> bool:
        return self.check_s is not None and callable(getattr(self.rec, "disk_table_version", None)) \
            and callable(getattr(self.rec, "reload", None))

    @property
    def table_version(self) -> int:
        v = getattr(self.rec, "table_version", 0)
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0

    def seconds_to_next(self) -> float:
        """How long the caller may sleep before the next check is due (inf when watching is off)."""
        if not self.enabled:
            return math.inf
        return max(0.0, self._next - self.clock())

    def maybe_reload(self) -> bool:
        """Check the disk version if a check is due; reload when it moved. -> True when a new table was loaded."""
        if not self.enabled or self.clock() < self._next:
            return False
        with self._lock:
            now = self.clock()
            if now < self._next:
                return False
            self._next = now + self.check_s
            on_disk = None
            try:
                on_disk = self.rec.disk_table_version()
                if on_disk == self.table_version or on_disk == self._failed:
                    return False
                before = self.table_version
                swapped = bool(self.rec.reload())
            except Exception as e:  # noqa: BLE001 - a half-written table must not stop the service
                self.errors += 1
                self._failed = on_disk
                log.error("item table reload failed (still serving version %s): %s: %s", self.table_version,
                          type(e).__name__, e, exc_info=e)
                return False
            if swapped:
                self.reloads += 1
                log.info("item table reloaded: version %s -> %s", before, self.table_version)
            return swapped


class WatchThread:
    """Runs a TableWatcher on its own daemon thread (the service's table watch, off the request path)."""

    def __init__(self, watcher: TableWatcher):
        self.watcher = watcher
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        if not self.watcher.enabled:
            return
        self._thread = threading.Thread(target=self._run, name="distillrec-table-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(min(self.watcher.check_s, max(0.001, self.watcher.seconds_to_next()))):
            self.watcher.maybe_reload()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


# ------------------------------------------------------------------------------------------------ batcher
_STOP = object()


class MicroBatcher:
    """A bounded queue and one worker thread answering queued recommend requests in batches.

    max_queue: requests that may wait (a full queue raises Overloaded at once: never unbounded memory).
    max_batch: most requests per session call.
    max_wait_ms: after taking what is queued, wait up to this long for more -- but only while requests arrive
      concurrently (the previous batch held more than one row). A lone client is therefore never delayed;
      with max_wait_ms=0 batches form only from requests that arrived while the previous batch ran
      (DEFAULT_BATCH_WAIT_MS says why 0.5 ms by default).
    on_batch: called from the worker with (batch size) after each session call (metrics).
    request_error: the exception type that is the caller's fault (export.runtime.RequestError; default: any
      exception class named RequestError): a batch refused with it is re-run row by row.

    `depth` is the number of queued requests, `peak_depth` its maximum so far (<= max_queue by construction).
    """

    def __init__(self, rec, *, max_queue: int = DEFAULT_MAX_QUEUE, max_batch: int = DEFAULT_BATCH_MAX,
                 max_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
                 on_batch: Optional[Callable[[int], None]] = None, request_error: Optional[type] = None):
        self.rec = rec
        self.request_error = request_error
        self.max_queue, self.max_batch, self.max_wait_s = int(max_queue), int(max_batch), float(max_wait_ms) / 1e3
        self.on_batch = on_batch
        self.native_allow = supports_allow(rec)
        self._q: queue.Queue = queue.Queue(maxsize=self.max_queue)
        self._thread: Optional[threading.Thread] = None
        self._closing = False
        self._last_batch = 1
        self._rows_per_s = 0.0  # EWMA of the worker's recent throughput, for Retry-After
        self.peak_depth = 0
        self.batches = 0

    # ---- state
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    @property
    def depth(self) -> int:
        return self._q.qsize()

    def retry_after(self) -> int:
        """Seconds a rejected client should wait: the queue's drain time at the recent rate, 1..60."""
        rate = self._rows_per_s
        if rate <= 0:
            return 1
        return int(min(_RETRY_AFTER_MAX_S, max(1, math.ceil(self.depth / rate))))

    # ---- lifecycle
    def start(self) -> "MicroBatcher":
        if self._thread is not None:
            raise RuntimeError("this MicroBatcher was already started; make a new one")
        self._thread = threading.Thread(target=self._run, name="distillrec-batcher", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking requests, answer the queued ones, stop the worker (waits up to `timeout` s). Requests
        still queued after that (a worker stuck in a session call) get BatcherClosed."""
        if self._closing:
            return
        self._closing = True
        if self._thread is not None and self._thread.is_alive():
            try:
                self._q.put(_STOP, timeout=timeout)
            except queue.Full:
                pass
            self._thread.join(timeout)
        self._cancel_leftovers()

    def _cancel_leftovers(self) -> None:
        left = []
        while True:
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                left.append(job)
        if left:
            self._resolve(left, [None] * len(left),
                          [BatcherClosed("the service is shutting down; retry on another instance")] * len(left))

    # ---- submitting
    def submit(self, job: RecommendJob, loop: Optional[asyncio.AbstractEventLoop] = None):
        """Queue `job`; -> its future (asyncio on `loop`, else concurrent.futures). Raises Overloaded when the
        queue is full, BatcherClosed when the batcher is not running."""
        if not self.running:
            raise BatcherClosed("the batcher is not running (starting or shutting down)")
        job.loop = loop
        job.future = loop.create_future() if loop is not None else concurrent.futures.Future()
        try:
            self._q.put_nowait(job)
        except queue.Full:
            raise Overloaded(self.max_queue, self.max_queue, self.retry_after()) from None
        if self._closing and not self._thread.is_alive():  # close() finished between the check and the put
            self._cancel_leftovers()
        d = self._q.qsize()
        if d > self.peak_depth:
            self.peak_depth = d
        return job.future

    async def recommend(self, job: RecommendJob) -> list:
        """Queue `job` and await its rows (raises what the runtime raised for this row, or Overloaded)."""
        return await self.submit(job, asyncio.get_running_loop())

    # ---- worker
    def _collect(self, first) -> tuple[list, bool]:
        """The batch that starts with `first`: everything queued (up to max_batch), then the adaptive wait.
        -> (jobs, stop_seen)."""
        batch, stop = [first], False
        while len(batch) < self.max_batch:
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                return batch, True
            batch.append(job)
        if self.max_wait_s > 0 and len(batch) < self.max_batch and self._last_batch > 1:
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    job = self._q.get(timeout=left)
                except queue.Empty:
                    break
                if job is _STOP:
                    return batch, True
                batch.append(job)
        return batch, stop

    def _run(self) -> None:
        while True:
            first = self._q.get()
            if first is _STOP:
                return
            batch, stop = self._collect(first)
            self._answer(batch)
            if stop:
                return

    def _answer(self, batch: list[RecommendJob]) -> None:
        """Run one batch and resolve every future; a failing row never fails the others."""
        jobs = [j for j in batch if not j.abandoned()]
        self._last_batch = len(batch)
        if not jobs:
            return
        t0 = time.perf_counter()
        results: list = [None] * len(jobs)
        errors: list = [None] * len(jobs)
        try:
            results = recommend_rows(self.rec, jobs, self.native_allow)
        except Exception as e:  # noqa: BLE001 - sorted out per row below
            if len(jobs) == 1 or not self._is_request_error(e):
                errors = [e] * len(jobs)  # a server fault (or a lone row's error) is that of every row
            else:
                results, errors = self._one_by_one(jobs)
        dt = time.perf_counter() - t0
        rate = len(jobs) / max(dt, 1e-6)
        self._rows_per_s = rate if self._rows_per_s == 0 else 0.8 * self._rows_per_s + 0.2 * rate
        self.batches += 1
        if self.on_batch is not None:
            try:
                self.on_batch(len(jobs))
            except Exception:  # noqa: BLE001 - metrics never fail a request
                log.exception("batch metrics callback failed")
        self._resolve(jobs, results, errors)

    def _one_by_one(self, jobs: list[RecommendJob]) -> tuple[list, list]:
        """The batch call was refused: answer each row alone, so only the offending rows get their error."""
        results, errors = [None] * len(jobs), [None] * len(jobs)
        for i, j in enumerate(jobs):
            try:
                results[i] = recommend_rows(self.rec, [j], self.native_allow)[0]
            except Exception as e:  # noqa: BLE001 - handed to that row's caller
                errors[i] = e
        return results, errors

    def _is_request_error(self, e: BaseException) -> bool:
        if self.request_error is not None:
            return isinstance(e, self.request_error)
        return any(c.__name__ == "RequestError" for c in type(e).__mro__)  # without importing the runtime here

    @staticmethod
    def _resolve(jobs: list, results: list, errors: list) -> None:
        """Hand each job its result: one call_soon_threadsafe per event loop for the whole batch."""
        by_loop: dict = {}
        for j, r, e in zip(jobs, results, errors):
            if j.loop is None:
                if not j.future.done():
                    j.future.set_exception(e) if e is not None else j.future.set_result(r)
            else:
                by_loop.setdefault(j.loop, []).append((j.future, r, e))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, items)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass


def _settle(items: list) -> None:
    """On the event loop: set each asyncio future (unless its waiter gave up)."""
    for fut, r, e in items:
        if fut.done():
            continue
        if e is not None:
            fut.set_exception(e)
        else:
            fut.set_result(r)
