"""Timing helpers: warm-up excluded, repeat until enough samples AND enough wall time, percentiles.

Every latency is one call of `fn(batch)` measured with `time.perf_counter` (injectable for tests).
A "call" serves `batch_size` requests at once; the statistics are given per call (`p50_ms` ...) and per
request (`per_request_p50_ms` ... = call latency / batch size: the amortised cost of one request, what the
throughput is made of). Throughput = requests served / busy time of the timed calls.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np

PERCENTILES = (50, 90, 99)


def summarize(lat_ms: Sequence[float], batch_size: int = 1, wall_s: Optional[float] = None) -> dict:
    """Percentiles (numpy's linear interpolation) of per-call latencies in ms, per call and per request."""
    a = np.asarray(lat_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no latency samples to summarise")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    p = np.percentile(a, PERCENTILES)
    busy_s = float(a.sum()) / 1e3
    out = dict(samples=int(a.size), batch_size=int(batch_size), mean_ms=float(a.mean()), min_ms=float(a.min()),
               max_ms=float(a.max()), busy_s=busy_s, wall_s=float(busy_s if wall_s is None else wall_s))
    for q, v in zip(PERCENTILES, p):
        out[f"p{q}_ms"] = float(v)
        out[f"per_request_p{q}_ms"] = float(v) / batch_size
    out["throughput_rps"] = batch_size * a.size / max(busy_s, 1e-12)
    return out


def time_calls(fn: Callable, batches: Sequence, warmup: int, min_samples: int, min_seconds: float,
               max_samples: Optional[int] = None, max_seconds: Optional[float] = None, batch_size: int = 1,
               clock: Callable[[], float] = time.perf_counter) -> dict:
    """Call fn(batch) round-robin over `batches`.

    The first `warmup` calls are not recorded. Timed calls go on until BOTH `min_samples` calls and
    `min_seconds` of timed-loop wall time are reached, or until a cap (`max_samples` calls /
    `max_seconds` of wall time, whichever first) stops it earlier; there is always at least one timed
    call. The result says which rule stopped it (`stopped_by`).
    """
    if not batches:
        raise ValueError("time_calls needs at least one batch")
    for i in range(max(0, warmup)):
        fn(batches[i % len(batches)])
    lat: list[float] = []
    t_start = clock()
    i = 0
    while True:
        t0 = clock()
        fn(batches[i % len(batches)])
        t1 = clock()
        lat.append((t1 - t0) * 1e3)
        i += 1
        elapsed = t1 - t_start
        if len(lat) >= min_samples and elapsed >= min_seconds:
            stopped_by = "min_samples+min_seconds"
            break
        if max_samples is not None and len(lat) >= max_samples:
            stopped_by = "max_samples"
            break
        if max_seconds is not None and elapsed >= max_seconds:
            stopped_by = "max_seconds"
            break
    out = summarize(lat, batch_size, wall_s=elapsed)
    out.update(warmup=int(max(0, warmup)), stopped_by=stopped_by)
    return out


def time_concurrent(fn: Callable, batches: Sequence, threads: int, warmup: int, min_samples: int,
                    min_seconds: float, max_seconds: Optional[float] = None, batch_size: int = 1) -> dict:
    """`threads` threads call fn(batch) in a loop at the same time (e.g. sharing one onnxruntime session).

    Each thread does `warmup` untimed calls first; then all start together. The run stops once the threads
    together made `min_samples` timed calls and `min_seconds` passed (or at `max_seconds`). Latency
    percentiles are over every timed call of every thread; throughput = requests completed / wall time.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    lats: list[list[float]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    start = threading.Barrier(threads + 1)
    stop = threading.Event()

    def work(j: int) -> None:
        try:
            for i in range(max(0, warmup)):
                fn(batches[(j + i) % len(batches)])
        except BaseException as e:  # surfaced by the caller below
            errors.append(e)
        start.wait()
        i = j
        mine = lats[j]
        while not stop.is_set() and not errors:
            t0 = time.perf_counter()
            try:
                fn(batches[i % len(batches)])
            except BaseException as e:
                errors.append(e)
                break
            mine.append((time.perf_counter() - t0) * 1e3)
            i += 1

    pool = [threading.Thread(target=work, args=(j,), daemon=True) for j in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    t_start = time.perf_counter()
    while True:
        time.sleep(0.002)
        elapsed = time.perf_counter() - t_start
        done = sum(len(x) for x in lats)
        if errors or (done >= min_samples and elapsed >= min_seconds) or \
                (max_seconds is not None and elapsed >= max_seconds):
            break
    stop.set()
    for t in pool:
        t.join()
    wall = time.perf_counter() - t_start
    if errors:
        raise errors[0]
    all_lat = [x for per in lats for x in per]
    out = summarize(all_lat, batch_size, wall_s=wall)
    out["throughput_rps"] = batch_size * len(all_lat) / max(wall, 1e-12)
    out.update(threads=threads, warmup=int(max(0, warmup)), per_thread_samples=[len(x) for x in lats])
    return out
