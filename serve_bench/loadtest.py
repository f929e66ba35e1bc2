"""Bounded load test of the HTTP service (export.service) on 127.0.0.1 only.

    python -m serve_bench.loadtest runs/<name> --clients 8 --seconds 10

The service is started in a subprocess (`export.service.serve(onnx_dir, host="127.0.0.1", port=<free port>)`),
waited for on GET /health, then `clients` threads each keep one HTTP/1.1 keep-alive connection and send
POST /recommend requests back to back for `seconds` seconds (and at most `max_requests` in total): the
test stops by itself. Requests are the protocol's test users' real histories (raw item ids + ratings)
when the run folder has its config.yaml, else seeded random histories of catalog ids. A request counts
as an error when it raises, times out, or answers anything but 200 with a JSON body holding `items`.
The service process is terminated at the end, whatever happened.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # never anything else: the load test only targets this machine


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _real_histories(run_dir: Path, n: int, seed: int) -> Optional[list[dict]]:
    """Bodies from the protocol's test users (needs the run's config.yaml and the dataset)."""
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        return None
    import yaml

    from distill.config import config_from_dict
    from distill.data import Split, load_dataset
    values = yaml.safe_load(cfg_path.read_text()) or {}
    data_cfg = config_from_dict({"data": values.get("data") or {}}).data  # the only section needed here
    ds = load_dataset(data_cfg)
    split = Split.leave_last_out(ds)
    raw_ids = json.loads((run_dir / "onnx" / "runtime.json").read_text())["item_ids"]
    rng = np.random.default_rng([seed, 31])
    users = rng.choice(split.eval_users, size=min(n, len(split.eval_users)), replace=False)
    bodies = []
    for u in users:
        items, ratings = split.history(int(u), "test", data_cfg.max_history)
        body = {"history": [str(raw_ids[i]) for i in items], "k": 10}
        if ratings is not None:
            body["ratings"] = [float(r) for r in ratings]
        bodies.append(body)
    return bodies


def _random_histories(onnx_dir: Path, n: int, seed: int) -> list[dict]:
    meta = json.loads((onnx_dir / "runtime.json").read_text())
    ids = [str(x) for x in meta["item_ids"]]
    L = int(meta.get("max_history", 50))
    uses_ratings = bool(meta.get("uses_ratings", True))  # a click-only model rejects ratings (400)
    rng = np.random.default_rng([seed, 37])
    bodies = []
    for _ in range(n):
        k = int(rng.integers(1, max(2, min(L, len(ids))) + 1))
        pick = rng.choice(len(ids), size=min(k, len(ids)), replace=False)
        body = {"history": [ids[i] for i in pick], "k": min(10, len(ids))}
        if uses_ratings:
            body["ratings"] = [int(r) for r in rng.integers(1, 6, size=len(pick))]
        bodies.append(body)
    return bodies


def _get(port: int, path: str, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def start_service(onnx_dir: Path, port: int, startup_timeout: float = 60.0,
                  intra_op_threads: Optional[int] = None, options: Optional[dict] = None) -> subprocess.Popen:
    """export.service.serve in a subprocess; returns once GET /health answers 200 (raises otherwise).

    `options`: extra keyword arguments of serve (e.g. {"batching": False}), passed as Python literals."""
    extra = "".join(f", {k}={v!r}" for k, v in (options or {}).items())
    code = ("import sys; from export.service import serve; "
            f"serve({str(onnx_dir)!r}, host={HOST!r}, port={port}, log_level='warning'"
            + (f", intra_op_threads={int(intra_op_threads)}" if intra_op_threads else "") + extra + ")")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"the service exited with code {proc.returncode} before answering: "
                               f"{out.strip()[-800:]}")
        try:
            status, _ = _get(port, "/health", timeout=2.0)
            if status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.1)
    stop_service(proc)
    raise RuntimeError(f"the service did not answer GET /health on {HOST}:{port} within {startup_timeout:.0f} s")


def stop_service(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if proc.stdout:
        proc.stdout.close()


def drive(port: int, bodies: list[dict], clients: int, seconds: float, max_requests: int = 1_000_000,
          timeout: float = 10.0, path: str = "/recommend") -> dict:
    """`clients` keep-alive clients POSTing `bodies` round-robin until `seconds` pass or `max_requests` are sent."""
    if clients < 1 or seconds <= 0:
        raise ValueError(f"clients must be >= 1 and seconds > 0, got {clients}, {seconds}")
    payloads = [json.dumps(b).encode() for b in bodies]
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[list[str]] = [[] for _ in range(clients)]
    sent = [0]
    lock = threading.Lock()
    t_start = time.perf_counter()
    deadline = t_start + seconds

    def client(j: int) -> None:
        conn = None
        i = j
        while time.perf_counter() < deadline:
            with lock:
                if sent[0] >= max_requests:
                    break
                sent[0] += 1
            body = payloads[i % len(payloads)]
            i += clients
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                if r.status != 200:
                    errors[j].append(f"HTTP {r.status}: {data[:200]!r}")
                elif "items" not in json.loads(data):
                    errors[j].append(f"no 'items' in the answer: {data[:200]!r}")
                else:
                    lat[j].append((time.perf_counter() - t0) * 1e3)
            except (OSError, http.client.HTTPException, ValueError) as e:
                errors[j].append(f"{type(e).__name__}: {e}")
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    pool = [threading.Thread(target=client, args=(j,), daemon=True) for j in range(clients)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=seconds + timeout + 30)
    wall = time.perf_counter() - t_start
    ok = np.array([x for per in lat for x in per], dtype=np.float64)
    errs = [e for per in errors for e in per]
    out = dict(clients=clients, seconds=seconds, wall_s=wall, requests=int(ok.size + len(errs)), ok=int(ok.size),
               errors=len(errs), error_examples=sorted(set(errs))[:5], throughput_rps=ok.size / max(wall, 1e-9),
               path=path, host=HOST, port=port, stopped_by="max_requests" if sent[0] >= max_requests else "time")
    if ok.size:
        p50, p90, p99 = np.percentile(ok, [50, 90, 99])
        out.update(p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), mean_ms=float(ok.mean()))
    return out


def drive_inprocess(onnx_dir: Path, bodies: list[dict], clients: int, seconds: float,
                    intra_op_threads: Optional[int] = None) -> dict:
    """The same bodies, `clients` threads calling Recommender.recommend directly (no HTTP) for `seconds`: the
    in-process throughput the service's req/s is a share of (run after the service stopped: same cores)."""
    from export.runtime import Recommender
    rec = Recommender(onnx_dir, intra_op_threads=intra_op_threads)
    lat: list[list[float]] = [[] for _ in range(clients)]
    deadline = time.perf_counter() + seconds

    def client(j: int) -> None:
        i = j
        while time.perf_counter() < deadline:
            b = bodies[i % len(bodies)]
            i += clients
            t0 = time.perf_counter()
            rec.recommend(b["history"], ratings=b.get("ratings"), k=b.get("k"))
            lat[j].append((time.perf_counter() - t0) * 1e3)

    t_start = time.perf_counter()
    pool = [threading.Thread(target=client, args=(j,), daemon=True) for j in range(clients)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.perf_counter() - t_start
    ok = np.array([x for per in lat for x in per], dtype=np.float64)
    p50, p99 = np.percentile(ok, [50, 99]) if ok.size else (float("nan"), float("nan"))
    return dict(clients=clients, requests=int(ok.size), throughput_rps=ok.size / max(wall, 1e-9),
                p50_ms=float(p50), p99_ms=float(p99), intra_op_threads=rec.intra_op_threads)


def run_loadtest(run_dir, clients: int = 8, seconds: float = 10.0, max_requests: int = 1_000_000,
                 n_bodies: int = 256, seed: int = 0, intra_op_threads: Optional[int] = None,
                 startup_timeout: float = 60.0, service_options: Optional[dict] = None,
                 inprocess: bool = False) -> dict:
    """Start the service over run_dir/onnx on 127.0.0.1, load it for `seconds`, stop it; -> summary dict.

    service_options: extra keyword arguments of export.service.serve (e.g. {"batching": False}).
    inprocess: afterwards, drive Recommender.recommend with the same bodies and clients for `seconds` without
    HTTP and report the service's req/s as a share of that ("share_of_inprocess")."""
    run_dir = Path(run_dir)
    onnx_dir = run_dir / "onnx"
    if not (onnx_dir / "runtime.json").exists():
        raise FileNotFoundError(f"{onnx_dir / 'runtime.json'} is missing; run `distillrec export {run_dir}`")
    bodies = None
    source = "protocol test users"
    try:
        bodies = _real_histories(run_dir, n_bodies, seed)
    except Exception as e:  # noqa: BLE001 - a run folder without its dataset still gets a load test
        source = f"random catalog ids (test users unavailable: {type(e).__name__})"
    if bodies is None:
        bodies = _random_histories(onnx_dir, n_bodies, seed)
        source = source if source != "protocol test users" else "random catalog ids (no config.yaml)"
    port = free_port()
    t0 = time.perf_counter()
    proc = start_service(onnx_dir, port, startup_timeout, intra_op_threads, service_options)
    startup = time.perf_counter() - t0
    try:
        out = drive(port, bodies, clients, seconds, max_requests)
    finally:
        stop_service(proc)
    out.update(requests_from=source, distinct_bodies=len(bodies), startup_s=startup,
               service="export.service.serve (uvicorn, 1 worker)", service_exit_code=proc.returncode,
               service_options=dict(service_options or {}))
    if inprocess:
        ref = drive_inprocess(onnx_dir, bodies, clients, seconds, intra_op_threads)
        out["inprocess"] = ref
        out["share_of_inprocess"] = out["throughput_rps"] / max(ref["throughput_rps"], 1e-9)
    return out


def _option(text: str) -> tuple[str, object]:
    """--option KEY=VALUE: VALUE as a JSON literal (false, 0.5, 128, null), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a serve() keyword), got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve_bench.loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--max-requests", type=int, default=1_000_000)
    p.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword of export.service.serve, e.g. --option batching=false --option batch_wait_ms=0.5")
    p.add_argument("--inprocess", action="store_true",
                   help="also drive Recommender.recommend in-process (same bodies, same clients) and report the share")
    args = p.parse_args(argv)
    print(json.dumps(run_loadtest(args.run_dir, args.clients, args.seconds, args.max_requests,
                                  service_options=dict(args.option), inprocess=args.inprocess), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
