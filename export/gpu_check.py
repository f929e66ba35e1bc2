"""GPU check of an exported runtime folder: do TensorRT and CUDA really serve, does FP16 run, are the TensorRT
engine / timing caches written? numpy + onnxruntime only (no torch), so it runs on a bare GPU box.

    python -m export.gpu_check runs/<name>/onnx [--out report.json] [--budget-s 240] [--trt-cache-root DIR]

For each (variant, provider) it builds a `Recommender`, records what onnxruntime actually runs (and any
fallback warning), compares the outputs with FP32 on the CPU provider on the same requests (max |diff| per
output, top-10 overlap) and times a few calls. Then it lists the TensorRT cache folders the runtime used
(outside the model folder: export.runtime.trt_cache_dir). The run's teacher_onnx/teacher.onnx (or --teacher) is
run on CUDA too. The report (JSON) is printed and written to --out. Exit status 0 unless the script itself
breaks: a provider that does not serve is a finding, recorded as such.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from export import contract as C


def _env() -> dict:
    import onnxruntime as ort
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "numpy": np.__version__,
           "onnxruntime": ort.__version__, "onnxruntime_package": ort.get_device(),
           "available_providers": ort.get_available_providers()}
    try:
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=20).stdout.strip()
    except Exception as e:
        env["nvidia_smi"] = f"unavailable: {e}"
    try:
        import tensorrt
        env["tensorrt_python"] = tensorrt.__version__
    except Exception:
        env["tensorrt_python"] = None
    return env


def _requests(n_items: int, max_history: int, seed: int = 0) -> list[tuple]:
    rng = np.random.default_rng(seed)
    out = []
    for b, L, c in ((1, min(10, max_history), 1), (8, max_history, 100), (32, max_history, 100)):
        length = rng.integers(1, L + 1, size=b)
        length[0] = L
        if b > 1:
            length[1] = 0  # an empty history
        out.append((rng.integers(0, n_items, (b, L)).astype(np.int64),
                    rng.integers(0, 6, (b, L)).astype(np.float32), length.astype(np.int64),
                    rng.integers(0, n_items, (b, c)).astype(np.int64)))
    return out


def _top10(a: np.ndarray, b: np.ndarray) -> float:
    k = min(10, a.shape[1])
    ta = np.argsort(-a, axis=1, kind="stable")[:, :k]
    tb = np.argsort(-b, axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta.tolist(), tb.tolist())]))


def check_one(folder: Path, variant: str, providers: list, reqs: list, ref: list,
              trt_cache_root: Optional[Path] = None) -> dict:
    from export.runtime import Recommender
    rec: dict = {"variant": variant, "requested": providers}
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = Recommender(folder, providers=providers, variant=variant, trt_cache_root=trt_cache_root)
        rec["trt_cache"] = None if r.trt_cache is None else str(r.trt_cache)
        rec["session_seconds"] = round(time.perf_counter() - t0, 2)
        rec["actual"] = r.providers
        rec["serves"] = r.providers[0]
        rec["serves_first_requested"] = r.providers[0] == r.requested_providers[0]
        rec["fallback_warning"] = r.provider_record.get("fallback_warning")
        rec["other_warnings"] = [str(w.message)[:300] for w in caught
                                 if "ProviderFallbackWarning" not in type(w.message).__name__][:5]
        diffs, overlaps, first = {}, [], None
        t1 = time.perf_counter()
        outs = [r.predict_arrays(*q) for q in reqs]  # first calls (TensorRT builds its engine here)
        first = time.perf_counter() - t1
        for out, base in zip(outs, ref):
            for k, v in out.items():
                d = float(np.max(np.abs(v.astype(np.float64) - base[k])))
                diffs[k] = max(diffs.get(k, 0.0), d)
                if not np.all(np.isfinite(v)):
                    rec.setdefault("problems", []).append(f"non-finite {k}")
            overlaps.append(_top10(base["next_item_scores"], out["next_item_scores"]))
        rec["first_calls_seconds"] = round(first, 2)
        times = []
        for _ in range(20):
            t = time.perf_counter()
            r.predict_arrays(*reqs[-1])
            times.append(time.perf_counter() - t)
        rec["p50_ms_batch32"] = round(1000 * float(np.median(times)), 3)
        rec["max_abs_diff_vs_cpu_fp32"] = diffs
        rec["top10_overlap_vs_cpu_fp32"] = float(np.mean(overlaps))
        rec["ok"] = "problems" not in rec
    except Exception as e:
        rec["ok"] = False
        rec["error"] = f"{type(e).__name__}: {str(e)[:800]}"
    return rec


def check_teacher(path: Path) -> dict:
    import onnxruntime as ort

    from export.providers import build_providers, create_session
    rec: dict = {"file": path.name}
    try:
        providers, record = build_providers(["cuda", "cpu"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sess, record = create_session(path, providers, record)
        rec["actual"] = record["actual"]
        rng = np.random.default_rng(0)
        b, t = 8, 128
        feed = {"input_ids": rng.integers(3, 200, (b, t)).astype(np.int64),
                "attention_mask": np.ones((b, t), np.int64),
                "before_pos": np.full(b, t - 10, np.int64), "item_pos": np.full(b, t - 1, np.int64)}
        cpu = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
        gpu = sess.run(None, feed)
        rec["max_abs_diff_vs_cpu"] = [float(np.max(np.abs(a - g))) for a, g in zip(cpu, gpu)]
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t0)
        rec["p50_ms_batch8x128"] = round(1000 * float(np.median(times)), 3)
        rec["ok"] = True
    except Exception as e:
        rec["ok"] = False
        rec["error"] = f"{type(e).__name__}: {str(e)[:800]}"
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="runtime folder (runs/<name>/onnx)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting new checks after this long")
    ap.add_argument("--trt-cache-root", type=Path, default=None,
                    help=f"TensorRT cache root (default ${C.TRT_CACHE_ENV} or ~/.cache/distillrec/trt)")
    ap.add_argument("--teacher", type=Path, default=None,
                    help=f"teacher ONNX to run on CUDA (default <run>/{C.TEACHER_ONNX_RELPATH})")
    args = ap.parse_args(argv)
    import onnxruntime as ort
    report: dict = {"env": _env()}
    if hasattr(ort, "preload_dlls"):  # CUDA / cuDNN libraries from nvidia-* wheels, when that is how they came
        try:
            ort.preload_dlls()
            report["env"]["preload_dlls"] = "ok"
        except Exception as e:
            report["env"]["preload_dlls"] = f"{type(e).__name__}: {e}"
    print(json.dumps(report["env"], indent=1), flush=True)
    folder = args.folder
    meta = json.loads((folder / C.RUNTIME_META_FILE).read_text())
    variants = sorted((meta.get("variants") or {"fp32": {}}).keys())
    reqs = _requests(int(meta["n_items"]), int(meta["max_history"]))
    from export.runtime import Recommender
    cpu = Recommender(folder, providers=["cpu"], variant="fp32" if "fp32" in variants else None)
    ref = [{k: v.astype(np.float64) for k, v in cpu.predict_arrays(*q).items()} for q in reqs]
    plan = [(v, ["tensorrt", "cuda", "cpu"]) for v in ("fp32", "fp16") if v in variants]
    plan += [(v, ["cuda", "cpu"]) for v in ("fp32", "fp16", "int8", "opt") if v in variants]
    plan += [("fp16", ["cpu"])] if "fp16" in variants else []  # must be refused with a clear message
    start = time.perf_counter()
    report["checks"] = []
    for variant, providers in plan:
        if time.perf_counter() - start > args.budget_s:
            report["checks"].append({"variant": variant, "requested": providers, "skipped": "time budget"})
            continue
        rec = check_one(folder, variant, providers, reqs, ref, args.trt_cache_root)
        if variant == "fp16" and providers == ["cpu"]:  # the expected outcome is a clear refusal
            rec["expected"] = "UnsupportedProviderError (FP16 is GPU-only)"
            rec["ok"] = "GPU-only" in rec.get("error", "")
        print(json.dumps(rec), flush=True)
        report["checks"].append(rec)
    caches = sorted({c["trt_cache"] for c in report["checks"] if c.get("trt_cache")})
    report["trt_cache"] = {c: sorted(f"{p.name} ({p.stat().st_size} B)" for p in Path(c).iterdir())
                           for c in caches if Path(c).is_dir()}
    teacher = args.teacher or C.teacher_onnx_path(folder.resolve().parent)
    if teacher.is_file() and time.perf_counter() - start < args.budget_s:
        report["teacher"] = check_teacher(teacher)
    report["seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
