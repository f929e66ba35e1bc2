"""bench/report.md + bench/latency.png + bench/quality_latency.png from the report dict (serve_bench.bench).

Everything here reads the report dict only, so a synthetic dict renders too (tests/test_bench.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from distill.io import atomic_path, atomic_write_text
from distill.metrics import format_metrics_table


def _fmt_bytes(n) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def _ms(v) -> str:
    if v is None:
        return "–"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _x(v) -> str:
    if v is None:
        return "–"
    return f"{v:,.0f}x" if v >= 10 else f"{v:.2f}x"


def _num(v, fmt="{:.4f}") -> str:
    return "–" if v is None else fmt.format(v)


def _find(points, system, requests, workload, batch, threads="all") -> Optional[dict]:
    return next((p for p in points if p["system"] == system and p["requests"] == requests
                 and p["workload"] == workload and p["batch"] == batch and p["threads"] == threads), None)


def _provider(s: dict) -> str:
    return f"{s.get('runtime', '?')} · {s.get('provider', '?')}"


# ---------------------------------------------------------------------------------------------- tables
def headline_table(report: dict) -> str:
    pts, systems, w = report["points"], report["systems"], report["workload"]
    fixed = w.get("fixed_set")
    b_big = max(w["batch_sizes"])
    b_mid = 32 if 32 in w["batch_sizes"] else b_big
    ref = next((s.get("ndcg10_all_users") for s in systems.values()
                if s.get("kind") == "student" and s.get("runtime") == "onnxruntime" and s.get("variant") == "fp32"
                and s.get("provider") == "CPUExecutionProvider" and s.get("serving") != "two_part"), None)
    h = f"h{w.get('fixed_history', 50)}"
    lines = [f"| system | runtime · provider | params | size | peak RSS | p50 b=1 {h} ms | p99 b=1 {h} ms | "
             f"p50 b={b_mid} ms | req/s b={b_big} | speed-up b=1 {h} (vs fastest teacher) | NDCG@10 teacher users | "
             f"NDCG@10 all users | ΔNDCG@10 vs ONNX FP32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in systems.items():
        p1 = _find(pts, name, fixed, "topk", 1) if fixed else None
        pm = _find(pts, name, "natural", "topk", b_mid)
        pb = _find(pts, name, "natural", "topk", b_big)
        nd = s.get("ndcg10_all_users")
        delta = "–" if nd is None or not ref else f"{100 * (nd - ref) / ref:+.2f}%"
        rss = s.get("peak_rss_mb")
        rss_cell = "–" if rss is None else f"{rss:,.0f} MB"
        rps_cell = "–" if not pb else f"{pb['throughput_rps']:,.1f}"
        lines.append(f"| {name} | {_provider(s)} | {s['params']:,} | {_fmt_bytes(s['bytes'])} | "
                     f"{rss_cell} | {_ms(p1 and p1['p50_ms'])} | "
                     f"{_ms(p1 and p1['p99_ms'])} | {_ms(pm and pm['p50_ms'])} | "
                     f"{rps_cell} | "
                     f"{_x(p1 and p1.get('speedup_p50_vs_fastest_teacher'))} | "
                     f"{_num(s.get('ndcg10_teacher_users'))} | {_num(nd)} | {delta} |")
    return "\n".join(lines)


def targets_table(report: dict) -> str:
    lines = ["| target | measured | met? |", "|---|---|---|"]
    for t in report.get("targets", []):
        met = {True: "**yes**", False: "**NO**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    return "\n".join(lines)


def grid_table(report: dict, requests: str, workload: str, threads="all", batches=None) -> str:
    """Rows = systems, one cell per batch: p50 / p90 / p99 per call (ms) and the speed-up vs the teacher."""
    pts = [p for p in report["points"] if p["requests"] == requests and p["workload"] == workload
           and p["threads"] == threads]
    if not pts:
        return "_(no points)_"
    batches = batches or sorted({p["batch"] for p in pts})
    head = "| system | " + " | ".join(f"b={b}: p50 / p90 / p99 ms (speed-up)" for b in batches) + " |"
    lines = [head, "|---|" + "---|" * len(batches)]
    for name in dict.fromkeys(p["system"] for p in pts):
        cells = []
        for b in batches:
            p = _find(pts, name, requests, workload, b, threads)
            if p is None:
                cells.append("not run")
                continue
            sp = p.get("speedup_p50_vs_fastest_teacher")
            est = "*" if p.get("p50_ms_all_candidates_est") else ""
            cells.append(f"{_ms(p['p50_ms'])} / {_ms(p['p90_ms'])} / {_ms(p['p99_ms'])}{est} ({_x(sp)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_request_table(report: dict, requests: str = "natural", workload: str = "topk") -> str:
    pts = [p for p in report["points"] if p["requests"] == requests and p["workload"] == workload
           and p["threads"] == "all"]
    if not pts:
        return "_(no points)_"
    batches = sorted({p["batch"] for p in pts})
    lines = ["| system | " + " | ".join(f"b={b}: per-request p50 / p99 ms · req/s" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]
    for name in dict.fromkeys(p["system"] for p in pts):
        cells = []
        for b in batches:
            p = _find(pts, name, requests, workload, b)
            cells.append("not run" if p is None else f"{_ms(p['per_request_p50_ms'])} / {_ms(p['per_request_p99_ms'])}"
                                                     f" · {p['throughput_rps']:,.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def single_thread_table(report: dict) -> str:
    fixed = report["workload"].get("fixed_set")
    pts = [p for p in report["points"] if p["requests"] == fixed and p["workload"] == "topk" and p["threads"] == 1]
    if not pts:
        return "_(no single-thread points)_"
    batches = sorted({p["batch"] for p in pts})
    lines = ["| system | " + " | ".join(f"b={b}: p50 ms 1 thread / all threads (ratio)" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]
    for name in dict.fromkeys(p["system"] for p in pts):
        cells = []
        for b in batches:
            p1, pa = _find(pts, name, fixed, "topk", b, 1), _find(report["points"], name, fixed, "topk", b)
            if p1 is None:
                cells.append("not run")
                continue
            ratio = f" ({p1['p50_ms'] / pa['p50_ms']:.2f})" if pa else ""
            cells.append(f"{_ms(p1['p50_ms'])} / {_ms(pa and pa['p50_ms'])}{ratio}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def concurrency_table(report: dict) -> str:
    rows = report.get("concurrency") or []
    if not rows:
        return "_(no concurrency points)_"
    lines = ["| system | threads sharing the session | p50 ms | p90 ms | p99 ms | req/s | calls |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['threads']} | {_ms(r['p50_ms'])} | {_ms(r['p90_ms'])} | {_ms(r['p99_ms'])}"
                     f" | {r['throughput_rps']:,.1f} | {r['samples']} |")
    return "\n".join(lines)


def size_table(report: dict) -> str:
    lines = ["| system | parameters | size on disk | peak RSS (own process) | RSS after imports | added by the model |",
             "|---|---|---|---|---|---|"]
    rss = report.get("rss") or {}
    for name, s in report["systems"].items():
        r = rss.get(name) or {}
        if "error" in r:
            cells = [r["error"][:120], "–", "–"]
        elif r:
            cells = [f"{r['peak_rss_mb']:,.1f} MB (batch {r['batch']})", f"{r['baseline_rss_mb']:,.1f} MB",
                     f"{r['model_rss_mb']:,.1f} MB"]
        else:
            cells = ["not measured", "–", "–"]
        lines.append(f"| {name} | {s['params']:,} | {_fmt_bytes(s['bytes'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def floor_section(report: dict) -> str:
    fl = report.get("floor") or {}
    if not fl.get("points"):
        return f"_(floor not computed: {fl.get('skipped', 'no data')})_"
    mm = fl["matmul"]
    lines = [f"Single-thread matmul rate: {mm['gflops']:.1f} GFLOP/s (onnxruntime MatMul {mm['m']}x{mm['k']} · "
             f"{mm['k']}x{mm['n']}, float32, p50). Per-call overhead: a trivial graph with the student's inputs and "
             f"outputs through the same runtime path and top-K step, one thread (bare `session.run` beside it). "
             f"floor = max(overhead, MatMul FLOPs / rate). Request set: {fl.get('requests')}.", "",
             "| workload | batch | MatMul FLOPs per call | compute at that rate ms | overhead ms (bare run) | floor ms | "
             "bound | student variants: p50 / floor (1 thread; all threads) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in fl["points"]:
        vs = []
        for name, v in r["variants"].items():
            one, allt = v.get("threads_1"), v.get("threads_all")
            vs.append(f"{name}: {_x(one and one['x_floor'])}; {_x(allt and allt['x_floor'])}")
        lines.append(f"| {r['workload']} | {r['batch']} | {r['flops_per_call'] / 1e6:,.2f} M | {_ms(r['compute_ms'])} | "
                     f"{_ms(r['overhead_ms'])} ({_ms(r['session_run_ms'])}) | {_ms(r['floor_ms'])} | {r['bound']} | "
                     f"{'<br>'.join(vs) or '–'} |")
    return "\n".join(lines)


def two_part_floor_section(report: dict) -> str:
    """The two-part roofline: the encoder's floor, each variant's session.run and API p50 / p99 (batch 1)."""
    tp = (report.get("floor") or {}).get("two_part")
    if not tp:
        return "_(two-part floor not measured: no two-part model in this run, or the floor is disabled)_"
    if tp.get("error"):
        return f"_(two-part floor failed: {tp['error']})_"
    lines = [f"The served two-part graph is encoder.onnx: {tp['encoder_flops'] / 1e6:,.2f} MFLOP of MatMuls per call "
             f"(batch {tp['batch']}, history {tp['history']}) = {_ms(tp['compute_ms'])} ms at the matmul rate; the "
             f"trivial graph with its inputs and outputs runs in {_ms(tp['trivial_run_ms'])} ms; floor = "
             f"{_ms(tp['floor_ms'])} ms ({tp['bound']}-bound). The catalog matmul (user vector x {tp['n_items']:,} item "
             f"vectors + bias, {tp['catalog_flops'] / 1e6:,.2f} MFLOP = {_ms(tp['catalog_compute_ms'])} ms at that rate) "
             f"is numpy in the runtime, outside the graph: it is part of the API's time, not of the floor. "
             f"API = `Recommender.recommend(raw ids, ratings, k={tp['top_k']})` (exact retrieval, history excluded), "
             f"timed interleaved with the bare session.run on the same requests; one intra-op thread.", "",
             "| encoder variant | session.run p50 / p99 ms | x floor | API p50 / p90 / p99 ms | API adds (p50) ms |",
             "|---|---|---|---|---|"]
    for name, v in tp["variants"].items():
        lines.append(f"| {name} ({v['file']}) | {_ms(v['session_p50_ms'])} / {_ms(v['session_p99_ms'])} | "
                     f"{_x(v['x_floor'])} | {_ms(v['api_p50_ms'])} / {_ms(v['api_p90_ms'])} / {_ms(v['api_p99_ms'])} | "
                     f"{v['api_adds_ms']:+.4f} |")
    return "\n".join(lines)


def profile_section(report: dict) -> str:
    prof = report.get("profile") or {}
    if not prof:
        return "_(no profile)_"
    out = []
    for name, p in prof.items():
        if "error" in p:
            out.append(f"**{name}**: {p['error']}")
            continue
        out.append(f"**{name}** — {p['calls']} profiled calls (batch 1, one thread): {_ms(p['run_ms_per_call'])} ms "
                   f"per run under the profiler, {_ms(p['kernel_ms_per_call'])} ms in kernels; "
                   f"{100 * (p['outside_kernels_share'] or 0):.0f}% of a run is outside kernels (scheduling, "
                   f"allocation, input/output copies, profiler).\n")
        out.append("| operator | ms per call | nodes per call | share of the run |\n|---|---|---|---|")
        for o in p["top_ops"]:
            share = o.get("share_of_call")
            out.append(f"| {o['op']} | {o['ms_per_call']:.4f} | {o['nodes_per_call']:.0f} | "
                       f"{'–' if share is None else f'{100 * share:.1f}%'} |")
        out.append("")
    return "\n".join(out)


def loadtest_section(report: dict) -> str:
    lt = report.get("loadtest")
    if not lt:
        return "_(not run: set `bench.loadtest: true`, or `python -m serve_bench.loadtest <run>`)_"
    if "errors" not in lt:
        return f"_(not measured: {lt.get('error') or lt.get('skipped')})_"
    lines = [f"{lt['clients']} concurrent keep-alive clients for {lt['seconds']} s against {lt.get('service', 'the service')}"
             f" on {lt['host']} (POST {lt['path']}, requests from {lt.get('requests_from', '?')}).", "",
             "| requests | ok | errors | req/s | p50 ms | p90 ms | p99 ms |", "|---|---|---|---|---|---|---|",
             f"| {lt['requests']} | {lt['ok']} | {lt['errors']} | {lt['throughput_rps']:,.1f} | {_ms(lt.get('p50_ms'))} | "
             f"{_ms(lt.get('p90_ms'))} | {_ms(lt.get('p99_ms'))} |"]
    if lt.get("error_examples"):
        lines += ["", "Errors seen: " + "; ".join(f"`{e}`" for e in lt["error_examples"])]
    return "\n".join(lines)


def _budget(report: dict) -> str:
    t, s = report.get("teacher") or {}, report.get("student") or {}
    b, c, p = t.get("budget") or {}, t.get("cost") or {}, t.get("params") or {}
    parts = []
    if b:
        parts.append(f"Teacher: {b.get('train_users')} training users, {b.get('steps')} LoRA steps (stopped by "
                     f"{b.get('stop_reason')}; max {b.get('max_steps')} steps / {b.get('time_budget_s')} s), evaluated on "
                     f"{b.get('eval_users')} test users with history <= {b.get('eval_history')}"
                     + (f"; {p['total']:,} parameters ({p.get('lora_trainable', 0):,} LoRA-trainable)" if p.get("total") else "")
                     + ".")
    if c.get("llm_tokens_per_dataset_token") is not None:
        parts.append(f"LLM tokens per dataset token: {c['llm_tokens_per_dataset_token']:.2f}; training "
                     f"{c.get('train_tokens_per_s', 0):.0f} tokens/s; evaluation {c.get('eval_users_per_s', 0):.1f} users/s.")
    if s.get("params") is not None:
        parts.append(f"Student: {s['params']:,} parameters, trained {s.get('train_seconds') or 0:.0f} s (best epoch "
                     f"{s.get('best_epoch')}, stop: {s.get('stop_reason')}); teacher soft labels cover "
                     f"{100 * (s.get('teacher_coverage') or 0):.1f}% of its training positions.")
    par = report.get("parity") or {}
    diff = par.get("max_abs_diff")
    if isinstance(diff, dict):
        diff = ", ".join(f"{k} {v:.1e}" for k, v in diff.items())
    verdict = {True: "passed", False: "FAILED"}.get(par.get("passed"), "not recorded")
    parts.append(f"ONNX parity (max |diff| vs PyTorch): {diff} ({verdict}).")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- ablation
ABLATION_REPORTS = ("ablation/report.json", "student/report.json")
"""Where `distillrec ablate` writes its report (its own folder; older versions wrote into student/): the
first that exists is read. Its report.md lies beside it and is linked from the bench report."""


def ablation_report_path(run: Path) -> Path:
    """The ablation's report.json in `run` (the first of ABLATION_REPORTS that exists, else the first)."""
    run = Path(run)
    return next((run / p for p in ABLATION_REPORTS if (run / p).exists()), run / ABLATION_REPORTS[0])


def load_ablation(run: Path, data_hash: Optional[str] = None, student_config: Optional[dict] = None) -> dict:
    """The ablation's own report (`distillrec ablate` -> ablation/report.json) condensed for the bench report.

    The bench reads it when it runs; `ablate` never rewrites the bench report (run the bench again to fold
    in a newer ablation). Returns {"missing": reason} when there is none or it belongs to other data, else
    the targets, the all-users and cold-start rows, parameter ratio, run time, `report_md` (the ablation's
    Markdown, relative to the run folder) plus `stale`: why the numbers may not describe this run (the
    teacher cache was rewritten after the ablation, or the student config differs)."""
    run = Path(run)
    path = ablation_report_path(run)
    cmd = f"distillrec ablate {run}"
    if not path.exists():
        return dict(missing=f"not run: `{cmd}` trains the ablation grid (about 30 min on 2 CPU cores) and writes "
                            f"{path.relative_to(run).parent}/report.md; run the bench again afterwards to show it here")
    try:
        rep = json.loads(path.read_text())
        out = dict(command=rep["command"], seeds=rep["seeds"], n_boot=rep["n_boot"],
                   minutes=rep["training_time"]["ablation_total_seconds"] / 60, targets=rep["targets"],
                   all_users=rep["all_users"], cold_start=rep["cold_start"],
                   ratio_params=rep["params"]["ratio_params"],
                   cut_by_time_budget=rep["training_time"].get("runs_cut_by_time_budget", []), stale=[],
                   report_md=str(path.relative_to(run).with_suffix(".md")))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return dict(missing=f"{path} is unreadable ({type(e).__name__}: {e}); run `{cmd}` again")
    if data_hash is not None and rep.get("data_hash") != data_hash:
        return dict(missing=f"{path} was produced on other data (hash {rep.get('data_hash')}, this run "
                            f"{data_hash}); run `{cmd}` again")
    manifest = run / "teacher_cache" / "manifest.json"
    if manifest.exists() and manifest.stat().st_mtime > path.stat().st_mtime:
        out["stale"].append("the teacher cache was rewritten after the ablation ran")
    if student_config is not None:
        old = rep.get("student_config") or {}
        student_config = json.loads(json.dumps(student_config))  # tuples -> lists, as the JSON file holds them
        # fields the ablation's version did not have yet are not a difference
        diff = sorted(k for k in old if k in student_config and old[k] != student_config[k])
        if diff:
            out["stale"].append("the student config differs from the ablation's in: " + ", ".join(diff))
    return out


def ablation_section(report: dict) -> str:
    ab = report.get("ablation")
    if not ab:
        return "_No ablation information in this report (written by an older version)._"
    if ab.get("missing"):
        return f"_{ab['missing'][0].upper()}{ab['missing'][1:]}._"
    md = ab.get("report_md", "ablation/report.md")
    lines = [f"Condensed from the ablation's own report [{md}](../{md}) (`{ab['command']}`): every model trained "
             f"once per seed {ab['seeds']}, {ab['minutes']:.1f} min in all; cells mean ± std over seeds [95% CI "
             f"over users of seed {ab['seeds'][0]}, {ab['n_boot']} resamples]. Student parameters: "
             f"{100 * ab['ratio_params']:.3f}% of the teacher's."]
    if ab["stale"]:
        lines += ["", f"**Stale:** {'; '.join(ab['stale'])}. Run `{ab['command']}` again for numbers of this run."]
    if ab["cut_by_time_budget"]:
        lines += ["", f"**Warning:** runs stopped by the time budget: {', '.join(ab['cut_by_time_budget'])}."]
    lines += ["", "| target | met | detail |", "| --- | --- | --- |"]
    lines += [f"| {t['target']} | {'**yes**' if t['met'] else '**no**'} | {t['detail']} |" for t in ab["targets"]]
    lines += ["", f"All {ab['all_users']['users']} test users:", "", format_metrics_table(ab["all_users"]["rows"])]
    cs = ab["cold_start"]
    if cs.get("rows"):
        lines += ["", f"Cold start ({cs['items']} items held out of student training; {cs['test_events']} test "
                      f"events target one of them):", "", format_metrics_table(cs["rows"])]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- scale
SCALE_REPORT = "bench/scale/report.json"
"""Where `distillrec scale-bench` (serve_bench.scale) writes its report; report.md and scale.png lie beside it."""


def load_scale_summary(run: Path) -> Optional[dict]:
    """The scale benchmark's headline for the bench report (None when it has not been run): its Markdown's path
    relative to bench/, the target verdict and the rows (items, mode, p50, recall)."""
    path = Path(run) / SCALE_REPORT
    if not path.exists():
        return None
    try:
        rep = json.loads(path.read_text())
        rows = [dict(items=r["items"], mode=r["mode"], p50_ms=r["p50_ms"], p99_ms=r["p99_ms"],
                     recall_at_k=r.get("recall_at_k")) for r in rep["rows"]]
        return dict(report_md="scale/report.md", command=rep.get("command"), target=rep.get("target") or {},
                    rows=rows, loadavg_start=rep.get("loadavg_start"))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return dict(report_md="scale/report.md", error=f"{path} is unreadable ({type(e).__name__}: {e})")


def scale_section(report: dict) -> str:
    """One line linking the scale benchmark's report (bench/scale/report.md), with its target verdict."""
    sc = report.get("scale")
    if not sc:
        return ("_Not run: `distillrec scale-bench <run>` measures two-part serving on synthetic catalogs of "
                "10^4-10^6 items (exact vs ANN); its report is linked here once it exists._")
    if sc.get("error"):
        return f"[{sc['report_md']}]({sc['report_md']}): {sc['error']}"
    t = sc.get("target") or {}
    met = {True: "met", False: "NOT met", None: "not measured"}[t.get("met")]
    sizes = ", ".join(f"{n:,}" for n in dict.fromkeys(r["items"] for r in sc["rows"]))
    return (f"Two-part serving on synthetic catalogs ({sizes} items, exact vs ANN): "
            f"[{sc['report_md']}]({sc['report_md']}) (`{sc.get('command')}`). Target ({t.get('target', '?')}): "
            f"{met}{' — ' + t['measured'] if t.get('measured') else ''}.")


# ---------------------------------------------------------------------------------------------- verdict
def _below_line(c: dict) -> str:
    sign = "<" if c["better"] == "higher" else ">"
    return (f"- **{c['system']}**: {c['metric']} {c['value']:.4f} {sign} {c['baseline']} {c['baseline_value']:.4f} "
            f"({c['better']} is better; {c['on']}, {c['users']} users)")


def baseline_verdict(report: dict) -> str:
    """The report's first lines: which systems fall below a non-learned baseline, or that none does."""
    bc = report.get("baseline_check")
    if not bc:
        return "_No baseline check in this report (written by an older version)._"
    if not bc["checks"]:
        return "_Baseline check: no system and baseline share a metric in this report._"
    metrics = ", ".join(dict.fromkeys(c["metric"] for c in bc["checks"]))
    if bc["ok"]:
        n = len({c["system"] for c in bc["checks"]})
        return (f"**Baseline check: passed.** All {n} systems beat the best non-learned baseline on every metric "
                f"compared ({metrics}; {len(bc['checks'])} comparisons on the same users).")
    names = list(dict.fromkeys(c["system"] for c in bc["below"]))
    lines = [f"**Warning: {len(names)} system(s) below a non-learned baseline** ({', '.join(names)}). A model that "
             f"ranks worse than popularity, or predicts worse than a mean, should not be served as it is: "
             f"check the data and the training budget (see the quality tables below).", ""]
    lines += [_below_line(c) for c in bc["below"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- catalog
def _catalog_rows(rows: dict) -> list[str]:
    out = []
    for name, c in rows.items():
        lift = c.get("popularity_lift")
        out.append(f"| {name} | {c['users']} | {c['distinct_items']:,} | {100 * c['coverage']:.1f}% | "
                   f"{c['mean_pop_percentile']:.1f} | {c['mean_train_count']:,.1f} | "
                   f"{'–' if lift is None else f'{lift:.2f}x'} |")
    return out


def catalog_section(report: dict) -> str:
    """Coverage and popularity bias of each system's top-K lists (serve_bench.quality)."""
    cat = report.get("catalog")
    if not cat:
        return "_(no catalog statistics in this report)_"
    k, n = cat["k"], cat["catalog_items"]
    head = [f"What each system recommends: its top-{k} unseen items for each test user. Catalog coverage = distinct "
            f"items recommended / {n:,} catalog items. Popularity percentile of an item = its mid-rank among the "
            f"catalog's items by training interactions (the catalog's mean is 50; 100 = only the most popular). "
            f"Training interactions = {cat.get('counts', 'interactions before the test targets')}; the catalog's "
            f"mean is {cat['catalog_mean_train_count']:,.1f} per item, and lift = the recommended items' mean / "
            f"that. Coverage grows with the number of users: compare rows on the same users.", "",
            f"| system | users | distinct items in top-{k} | catalog coverage | mean popularity percentile | "
            f"mean training interactions per recommendation | popularity lift |",
            "|---|---|---|---|---|---|---|"]
    all_rows, sub_rows = cat.get("all_users") or {}, cat.get("teacher_users") or {}
    if all_rows and sub_rows and _n_users(all_rows) == _n_users(sub_rows):
        # the teacher covered every test user: one set of users, each system once
        sub_rows = {name: c for name, c in sub_rows.items() if name not in all_rows}
    return "\n".join(head + _catalog_rows(all_rows) + _catalog_rows(sub_rows))


def _n_users(rows: dict) -> int:
    return next(iter(rows.values()))["users"]


# ---------------------------------------------------------------------------------------------- sections
def machine_section(report: dict) -> str:
    m, th = report["machine"], report.get("threads") or {}
    torch_threads = th.get("torch_all_threads")
    torch_part = f"PyTorch all = {torch_threads}; " if torch_threads is not None else ""
    versions = f"Python {m.get('python')}" + (f", torch {m['torch']}" if m.get("torch") else "") + \
        f", onnxruntime {m.get('onnxruntime')}, numpy {m.get('numpy')}"
    return f"""Machine: {m.get('cpu_model', m.get('processor') or '?')} · {m.get('cpu_count')} logical CPUs
({m.get('physical_cores', '?')} physical, {m.get('affinity_cpus', '?')} usable) · {m.get('memory_gb', '?')} GB ·
{m.get('platform')}{' · GPU ' + m['gpu'] if m.get('gpu') else ''}.
Versions: {versions}.
Threads: {torch_part}onnxruntime all = {th.get('ort_all_threads')}; single-thread
setting = 1 (torch.set_num_threads / intra_op_num_threads). PyTorch device: {report['device']}. Seed {report['seed']}.
Bench wall time: {report.get('bench_seconds', 0):.0f} s."""


def headline_section(report: dict) -> str:
    w = report["workload"]
    return f"""## Headline

Request: one protocol test user's real history (last <= 50 events before the test event) → full-catalog
top-{w.get('top_k', 10)} of unseen items. `h{w.get('fixed_history')}` = the fixed-length set (every history exactly
{w.get('fixed_history')} events, {w.get('fixed_requests')} users). Speed-ups are p50 ratios measured in this run.

{headline_table(report)}"""


def targets_section(report: dict) -> str:
    return f"""## Targets

{targets_table(report)}

The student ONNX row the targets are read on is the fastest CPU variant at batch 1 whose NDCG@10 stays within 1%
of ONNX FP32 (a variant that lost quality cannot claim the latency)."""


def latency_section(report: dict) -> str:
    w = report["workload"]
    fixed = w.get("fixed_set")
    tc, nc = w.get("teacher_candidates", 1), w.get("candidates", 100)
    teacher_bs = w.get("teacher_batch_sizes") or w["batch_sizes"]
    fixed_tables = (f"Top-K over the catalog:\n\n{grid_table(report, fixed, 'topk')}\n\n"
                    f"Scoring {nc} candidates (cells marked * as above):\n\n{grid_table(report, fixed, 'candidates')}"
                    if fixed else "_(no user has that much history)_")
    return f"""## Latency per call: top-K over the catalog, natural-length histories, all threads

{w['requests']} requests (mean history {w['mean_history']:.1f}); each batch is padded to its longest history.
Cells: p50 / p90 / p99 per call in ms (speed-up of p50 vs the teacher's fastest form at the same batch).
The teacher runs batch sizes {teacher_bs} only, capped at {w['teacher_max_samples']} calls / {w['teacher_max_seconds']} s
per point (it takes seconds per batch on a CPU); the other systems: >= {w['min_samples']} calls and >= {w['min_seconds']} s,
after {w['warmup']} warm-up calls.

{grid_table(report, 'natural', 'topk')}

![latency vs batch size](latency.png)

### Scoring {nc} candidates per request (rating + like), natural-length histories

The students score all {nc} candidates in one pass (the graph also returns the catalog scores). The teacher reads
each candidate's text after the history, so {nc} candidates cost {nc} sequence passes; it was measured on
{tc} candidate(s) per request and its cells marked * show p50 / p90 / p99 of that measurement — its speed-ups use
the linear estimate for {nc} candidates (measured p50 × {nc}/{tc}).

{grid_table(report, 'natural', 'candidates')}

### Fixed-length histories ({w.get('fixed_history')} events, no padding)

{fixed_tables}

### Per request and throughput (top-K, natural-length)

Per-request latency = call latency / batch size (the amortised cost of one request); req/s = requests / busy time.

{per_request_table(report)}

### One thread vs all threads (fixed-length, top-K)

{single_thread_table(report)}

### Concurrency: N threads sharing one onnxruntime session (batch 1, one intra-op thread per call)

{concurrency_table(report)}"""


def floor_and_profile_section(report: dict) -> str:
    return f"""## Floor (roofline) and where the student's time goes

{floor_section(report)}

### Two-part serving (encoder + item table)

{two_part_floor_section(report)}

{profile_section(report)}"""


def size_section(report: dict) -> str:
    return f"""## Size and memory

Peak RSS is measured in a separate process per system (`python -m serve_bench.probe`): it imports what that system's
serving path needs (torch only for PyTorch systems), loads the model and runs requests of the top-K workload;
peak = the process's high-water mark VmHWM (interpreter and libraries included), "added by the model" = peak - RSS after imports.

{size_table(report)}"""


def quality_section(report: dict) -> str:
    qs, qa = report["quality_teacher_subset"], report["quality_all_users"]
    all_users_note = "" if qa["users"] == qs["users"] else " (the teacher's budget did not cover them all)"
    return f"""## Quality on the teacher's evaluation users ({qs['users']} users; protocol test split, 95% bootstrap CIs over users)

Every system on the same users; the ONNX rows are computed through their own runtime session.

{format_metrics_table(qs['rows'])}

## Quality on all {qa['users']} test users{all_users_note}

{format_metrics_table(qa['rows'])}

![quality vs latency](quality_latency.png)

## Catalog coverage and popularity bias of the top-{(report.get('catalog') or {}).get('k', 10)}

{catalog_section(report)}"""


def not_measured_section(report: dict) -> str:
    """Systems that were not measured (each with its reason), then the run's notes under their own heading."""
    skipped = [f"- {s['system']}: {s['reason']}" for s in report.get("skipped", [])]
    lines = ["## Systems not measured", "", "\n".join(skipped) if skipped else "None: every configured system ran."]
    notes = [f"- {n}" for n in report.get("notes", [])]
    if notes:
        lines += ["", "Notes:", "", "\n".join(notes)]
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    """bench/report.md: the baseline verdict first, then machine, headline, targets, latency, floor, size,
    quality (with catalog coverage), ablation, load test, what was not measured, and the budgets."""
    sections = [
        "# distillrec benchmark report",
        baseline_verdict(report),
        machine_section(report),
        headline_section(report),
        targets_section(report),
        latency_section(report),
        floor_and_profile_section(report),
        size_section(report),
        quality_section(report),
        f"## Distillation ablation: what the teacher adds\n\n{ablation_section(report)}",
        f"## Load test of the HTTP service\n\n{loadtest_section(report)}",
        f"## Scale benchmark (two-part serving, 10^4-10^6 items)\n\n{scale_section(report)}",
        not_measured_section(report),
        f"## Budget\n\n{_budget(report)}",
    ]
    return "\n\n".join(sections) + "\n"


def write_report(report: dict, out: Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", render_markdown(report))
    plot_latency(report, out / "latency.png")
    plot_quality_latency(report, out / "quality_latency.png")


# ---------------------------------------------------------------------------------------------- plots
def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_latency(report: dict, path: Path) -> None:
    """p50 per call vs batch size, one line per system, log-log; top-K and candidate workloads side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, wl in zip(axes, ("topk", "candidates")):
        pts = [p for p in report["points"] if p["requests"] == "natural" and p["workload"] == wl and p["threads"] == "all"]
        for name in dict.fromkeys(p["system"] for p in pts):
            mine = sorted((p for p in pts if p["system"] == name), key=lambda p: p["batch"])
            style = "--" if report["systems"].get(name, {}).get("kind") == "teacher" else "-"
            ax.plot([p["batch"] for p in mine], [p["p50_ms"] for p in mine], style, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (requests per call)")
        ax.set_title("full-catalog top-K" if wl == "topk" else
                     f"{report['workload'].get('candidates', 100)} candidates (teacher: "
                     f"{report['workload'].get('teacher_candidates', 1)} measured)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("p50 latency per call (ms)")
    axes[0].legend(fontsize=7)
    _save(fig, path)


def plot_quality_latency(report: dict, path: Path) -> None:
    """NDCG@10 on the teacher's evaluation users (all systems have it) vs p50 at batch 1."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fixed = report["workload"].get("fixed_set")
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, s in report["systems"].items():
        y = s.get("ndcg10_teacher_users")
        p = (_find(report["points"], name, fixed, "topk", 1) if fixed else None) or \
            _find(report["points"], name, "natural", "topk", 1)
        if y is None or p is None:
            continue
        ax.scatter([p["p50_ms"]], [y], s=45, marker="s" if s.get("kind") == "teacher" else "o", label=name,
                   alpha=0.85)
    ax.set_xscale("log")
    ax.set_xlabel(f"p50 latency, batch 1, top-K ({'history ' + str(report['workload'].get('fixed_history')) if fixed else 'natural histories'}), ms")
    ax.set_ylabel("NDCG@10 on the teacher's evaluation users")
    ax.set_title("Quality vs latency (up and to the left is better)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.collections:
        ax.legend(fontsize=7, loc="best")
    _save(fig, path)
