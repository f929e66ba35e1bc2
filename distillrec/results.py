"""README figures from a real run, never typed by hand.

`distillrec results RUN` reads the run's artifacts (bench/report.json, config.yaml, run_timings.json) into a
small snapshot, docs/results/<name>.json, and rewrites the README block between the `results:begin` and
`results:end` markers from that snapshot. tests/test_readme.py renders the committed snapshot again and fails when
the README block differs, so a quoted figure cannot drift from what the run wrote.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import yaml

from distill.io import atomic_write_text

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
QUALITY_ROWS = [("teacher", "teacher"), ("student (KD)", "student"), ("student without KD", "student (no KD)"),
                ("popularity / item mean", "popularity")]
ABLATION_ROWS = [("KD student", "student (KD, all components)"), ("+ rank KD", "+ ranking distillation (DLLM2Rec)"),
                 ("no-KD student", "student without KD (hard labels, text vectors)"),
                 ("KD behind the validation guard", "student (KD) behind the validation guard (student.kd_guard)")]


class ResultsError(ValueError):
    """A run folder lacks what the README block needs (which stage to run is in the message)."""


def _read(path: Path) -> dict:
    if not path.exists():
        raise ResultsError(f"{path} not found: run the stage that writes it (distillrec run / bench / ablate)")
    return json.loads(path.read_text())


def _metric(rows: dict, row: str, task: str, name: str) -> Optional[dict]:
    block = rows.get(row, {}).get(task, {}).get(name)
    if block is None:
        return None
    out = {"value": block["value"]}
    if "ci" in block:
        out["ci"] = list(block["ci"])
    if "std" in block:
        out["std"] = block["std"]
    return out


def _quality(report: dict) -> dict:
    """Every row on the same users: the teacher's users when they are all test users, else all users."""
    sub, full = report.get("quality_teacher_subset", {}), report["quality_all_users"]
    rows = dict(full["rows"])
    if sub.get("users") == full["users"] and "teacher" in sub.get("rows", {}):
        rows["teacher"] = sub["rows"]["teacher"]
    out = {}
    for label, key in QUALITY_ROWS:
        if key not in rows:
            continue
        out[label] = {"NDCG@10": _metric(rows, key, "next_item", "NDCG@10"), "HR@10": _metric(rows, key, "next_item", "HR@10"),
                      "RMSE": _metric(rows, key, "rating", "RMSE"), "AUC": _metric(rows, key, "like", "AUC")}
        if key == "popularity":  # rating/like baselines come from the item mean
            out[label]["RMSE"] = _metric(rows, "item_mean", "rating", "RMSE")
            out[label]["AUC"] = _metric(rows, "item_mean", "like", "AUC")
    return {"users": full["users"], "rows": out}


def _latency(report: dict) -> dict:
    """p50/p99 of the headline point: batch 1, fixed 50-event histories, full-catalog top-K, all threads."""
    out = {}
    for p in report["points"]:
        if p.get("requests") == "fixed50" and p["batch"] == 1 and p["workload"] == "topk" and p["threads"] == "all":
            out[p["system"]] = {"p50_ms": p["p50_ms"], "p99_ms": p["p99_ms"]}
    return out


def _ablation(report: dict) -> Optional[dict]:
    abl = report.get("ablation") or {}
    rows = (abl.get("all_users") or {}).get("rows") or {}
    if not rows:
        return None
    return {"seeds": abl.get("seeds"), "users": abl["all_users"].get("users"),
            "rows": {label: _metric(rows, key, "next_item", "NDCG@10") for label, key in ABLATION_ROWS if key in rows}}


def _labelling(run_dir: Path) -> Optional[dict]:
    path = run_dir / "teacher_cache" / "manifest.json"
    if not path.exists():
        return None
    man = json.loads(path.read_text())
    lab = man.get("labelling") or {}
    return {"rows": man.get("rows"), "users": man.get("users"), "interactions_per_s": lab.get("interactions_per_s")}


def snapshot(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    report = _read(run_dir / "bench" / "report.json")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    timings = run_dir / "run_timings.json"
    machine = report.get("machine", {})
    speed = next((t for t in report.get("targets", []) if "1000x" in t.get("target", "")), None)
    return {
        "run": run_dir.name, "seed": report.get("seed"), "data_hash": (cfg.get("_meta") or {}).get("data_hash"),
        "package_version": (cfg.get("_meta") or {}).get("package_version"),
        "machine": f"{machine.get('cpu_model', '?')}, {machine.get('cpu_count', '?')} logical CPUs",
        "stage_seconds": json.loads(timings.read_text()) if timings.exists() else None,
        "quality": _quality(report), "latency_b1_h50": _latency(report),
        "speedup_vs_fastest_teacher": speed and {"value": speed["value"], "measured": speed["measured"]},
        "student": {"params": report.get("student", {}).get("params"),
                    "onnx_bytes": report.get("sizes", {}).get("student (ONNX) [CPU]", {}).get("bytes")},
        "ablation": _ablation(report),
        "labelling": _labelling(run_dir),
    }


def _num(m: Optional[dict], digits: int, ci: bool = False) -> str:
    if m is None:
        return "–"
    s = f"{m['value']:.{digits}f}"
    if ci and "ci" in m:
        s += f" [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"
    return s


def render(snap: dict) -> str:
    q = snap["quality"]
    lines = [f"Run `{snap['run']}`, seed {snap['seed']}, on {snap['machine']}; every row on all "
             f"{q['users']} test users, 95% bootstrap CIs over users.", ""]
    if snap.get("stage_seconds"):
        st = snap["stage_seconds"]
        total = sum(st.values())
        lines += [f"Wall time {int(total // 60)} min {int(total % 60)} s: " +
                  ", ".join(f"{k} {v:.0f} s" for k, v in st.items()) + ".", ""]
    lab = snap.get("labelling")
    if lab and lab.get("interactions_per_s"):
        lines += [f"The teacher labelled {lab['rows']:,} training positions of {lab['users']:,} users at "
                  f"{lab['interactions_per_s']:,.0f} interactions/s.", ""]
    lines += ["| system | NDCG@10 | HR@10 | RMSE | like AUC |", "|---|---|---|---|---|"]
    for label, m in q["rows"].items():
        lines.append(f"| {label} | {_num(m['NDCG@10'], 4, ci=True)} | {_num(m['HR@10'], 3)} | {_num(m['RMSE'], 3)} | "
                     f"{_num(m['AUC'], 3)} |")
    abl = snap.get("ablation")
    if abl and abl["rows"]:
        parts = [f"{label} {m['value']:.4f} ± {m.get('std', 0):.4f}" for label, m in abl["rows"].items() if m]
        lines += ["", f"Over {len(abl['seeds'] or [])} seeds (`distillrec ablate`, {abl['users']} users), NDCG@10: "
                  + "; ".join(parts) + "."]
    lat = snap["latency_b1_h50"]
    if lat:
        lines += ["", "Latency of one request (batch 1, 50-event history, full-catalog top-10):", "",
                  "| system | p50 ms | p99 ms |", "|---|---|---|"]
        lines += [f"| {s} | {v['p50_ms']:.3g} | {v['p99_ms']:.3g} |" for s, v in lat.items()]
        lines.append("")
    if snap.get("speedup_vs_fastest_teacher"):
        lines.append(f"Student vs the teacher's fastest form: {snap['speedup_vs_fastest_teacher']['measured']}.")
    st = snap["student"]
    if st.get("params"):
        lines.append(f"The student has {st['params']:,} parameters; its ONNX file is "
                     f"{(st['onnx_bytes'] or 0) / 2**20:.1f} MB.")
    return "\n".join(lines)


def readme_block(text: str) -> str:
    if BEGIN not in text or END not in text:
        raise ResultsError(f"README has no {BEGIN} ... {END} block to fill")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def update_readme(readme: Path, snap: dict) -> bool:
    text = readme.read_text()
    old = readme_block(text)
    new = render(snap)
    if old == new:
        return False
    head, rest = text.split(BEGIN, 1)
    atomic_write_text(readme, head + BEGIN + "\n" + new + "\n" + END + rest.split(END, 1)[1])
    return True
