"""Peak memory of ONE system, measured in a process of its own.

    python -m serve_bench.probe spec.json      # prints one JSON line (the last line of stdout)

The child imports only what the system's serving path needs (an onnxruntime student never imports
torch), records its RSS after those imports (`baseline_rss_mb`), loads the system, runs `calls` requests
of the top-K workload, and reports the peak: the process's high-water mark (`peak_rss_mb`, which includes
the interpreter and the libraries) and the largest RSS seen after a
call. `model_rss_mb` = peak - baseline: what loading and running the model added. The peak is VmHWM
(/proc/self/status: the high-water mark of this process image), falling back to ru_maxrss elsewhere.

spec: {"kind": "student_onnx" | "student_torch" | "teacher_torch" | "teacher_onnx", "requests": npz of a
RequestSet (or, for teacher_onnx, "feeds": npz of pre-tokenized teacher inputs), "batch", "calls",
"n_candidates", "top_k", plus per kind: onnx_dir / variant / model_file / providers / run / device / cfg}.
The teacher's onnxruntime child gets its requests already tokenized, so it does not load the tokenizer's
dependencies (torch): its RSS is that of serving the graph.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]


def _proc_status_mb(key: str) -> Optional[float]:
    """VmHWM / VmRSS of this process from /proc (Linux), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peak_mb() -> float:
    """Peak RSS of THIS process image. VmHWM first: it belongs to the address space created by exec, whereas
    Linux carries ru_maxrss over from the forking parent (a child of a big process would report the parent's
    peak)."""
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def _rss_mb() -> Optional[float]:
    cur = _proc_status_mb("VmRSS")
    if cur is not None:
        return cur
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2 ** 20
    except ImportError:
        return None


def _child(spec: dict) -> dict:
    import numpy as np
    kind = spec["kind"]
    t0 = time.perf_counter()
    if kind in ("student_torch", "teacher_torch"):
        import torch  # noqa: F401
    else:
        import onnxruntime  # noqa: F401
    baseline = _rss_mb()
    baseline_max = _peak_mb()
    from serve_bench.workload import RequestSet, top_k_unseen
    if kind == "teacher_onnx":
        from serve_bench.systems import TeacherOnnxSystem
        system = TeacherOnnxSystem(Path(spec["path"]), providers=spec.get("providers"))
        with np.load(spec["feeds"]) as z:
            feed = {k: z[k] for k in z.files}
        feed["n_candidates"] = int(feed["n_candidates"])
        items, length = feed.pop("history_items"), feed.pop("history_length")

        def call(_):
            out = system.run_feed(feed)
            top_k_unseen(out["next_item"], items, length, spec.get("top_k", 10))
        batches = [None]
    else:
        if kind == "student_onnx":
            from serve_bench.systems import StudentOnnxSystem
            system = StudentOnnxSystem(Path(spec["onnx_dir"]), spec.get("variant", "fp32"), spec.get("providers"),
                                       model_file=spec.get("model_file"))
        elif kind == "student_torch":
            from serve_bench.systems import StudentTorchSystem
            system = StudentTorchSystem(Path(spec["run"]), spec.get("device", "cpu"))
        elif kind == "teacher_torch":
            from distill.config import config_from_dict
            from serve_bench.systems import TeacherTorchSystem
            cfg = config_from_dict(spec["cfg"])
            system = TeacherTorchSystem(Path(spec["run"]), cfg, spec.get("device", "cpu"))
        else:
            raise ValueError(f"unknown system kind {kind!r}")
        rs = RequestSet.load(spec["requests"])
        batches = rs.batches(int(spec.get("batch", 1)), int(spec.get("n_candidates", 1)))

        def call(req):
            out = system.forward(req)
            top_k_unseen(out["next_item"], req[0], req[2], spec.get("top_k", 10))
    loaded = _rss_mb()
    seen = [x for x in (baseline, loaded) if x is not None]
    for i in range(max(1, int(spec.get("calls", 5)))):
        call(batches[i % len(batches)])
        r = _rss_mb()
        if r is not None:
            seen.append(r)
    peak = _peak_mb()
    return dict(kind=kind, pid=os.getpid(), peak_rss_mb=peak, baseline_rss_mb=baseline if baseline is not None
                else baseline_max, model_rss_mb=peak - (baseline if baseline is not None else baseline_max),
                sampled_peak_rss_mb=max(seen) if seen else None, after_load_rss_mb=loaded,
                batch=int(spec.get("batch", 1)), calls=int(spec.get("calls", 5)),
                provider=getattr(system, "provider", None), seconds=time.perf_counter() - t0)


def measure_rss(spec: dict, timeout: float = 600.0) -> dict:
    """Run the probe for `spec` in a fresh Python process; returns its JSON (or {'error': ...})."""
    with tempfile.TemporaryDirectory(prefix="rss_probe_") as tmp:
        path = Path(tmp) / "spec.json"
        path.write_text(json.dumps(spec, default=str))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("TQDM_DISABLE", "1")
        try:
            p = subprocess.run([sys.executable, "-m", "serve_bench.probe", str(path)], cwd=str(REPO), env=env,
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"RSS probe of {spec.get('kind')} timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.strip().splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"error": f"RSS probe of {spec.get('kind')} failed (exit {p.returncode}): {' | '.join(tail)}"}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m serve_bench.probe spec.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    print(json.dumps(_child(spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
