"""bench/report.md + bench/latency.png from the report dict."""
from __future__ import annotations

from pathlib import Path

from distill.io import atomic_path, atomic_write_text
from distill.metrics import format_metrics_table


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GB"


def latency_table(report: dict) -> str:
    batches = report["workload"]["batch_sizes"]
    head = "| system | " + " | ".join(f"b={b} p50 ms | b={b} p99 ms | b={b} req/s | b={b} speed-up" for b in batches) + " |"
    sep = "|---|" + "---|" * (4 * len(batches))
    lines = [head, sep]
    for name, rows in report["latency"].items():
        cells = []
        for b in batches:
            st = rows[str(b)]
            cells += [f"{st['p50_ms']:.3f}", f"{st['p99_ms']:.3f}", f"{st['throughput_rps']:.1f}",
                      f"{st['speedup_p50_vs_teacher']:.0f}x"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def size_table(report: dict) -> str:
    lines = ["| system | parameters | size on disk |", "|---|---|---|"]
    for name, s in report["sizes"].items():
        lines.append(f"| {name} | {s['params']:,} | {_fmt_bytes(s['bytes'])} |")
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> None:
    w, t, m = report["workload"], report["teacher"], report["machine"]
    samples = {name: {b: st["samples"] for b, st in rows.items()} for name, rows in report["latency"].items()}
    qs, qa = report["quality_teacher_subset"], report["quality_all_users"]
    md = f"""# distillrec benchmark report

Machine: {m.get('platform')} · {m.get('cpu_count')} CPUs · torch {m.get('torch')} ({m.get('torch_threads')} threads)
{'· GPU ' + m['gpu'] if m.get('gpu') else ''} · device for PyTorch systems: {report['device']} · seed {report['seed']}

## Latency (same requests, same process, warm-up excluded)

Requests: {w['requests']} protocol test users, {w['history']} (mean {w['mean_history']:.1f}), {w['candidates']} candidate;
each call returns full-catalog next_item scores + rating + like. Speed-up = teacher p50 / system p50 at the
same batch size. Calls per point: {samples} (students: >= {w['min_samples']} calls and >= {w['min_seconds']} s;
teacher capped at {w['teacher_max_samples']} calls / {w['teacher_max_seconds']} s — it takes seconds per batch on a CPU).

{latency_table(report)}

![latency](latency.png)

{size_table(report)}

## Quality on the teacher's evaluation users ({qs['users']} users; protocol test split, 95% bootstrap CIs over users)

{format_metrics_table(qs['rows'])}

## Quality on all {qa['users']} test users (the teacher's budget did not cover them all)

{format_metrics_table(qa['rows'])}

## Budget

Teacher: {t['budget']['train_users']} training users, {t['budget']['steps']} LoRA steps (stopped by {t['budget']['stop_reason']};
max {t['budget']['max_steps']} steps / {t['budget']['time_budget_s']} s), evaluated on {t['budget']['eval_users']} test users with
history <= {t['budget']['eval_history']}; {t['params']['total']:,} parameters ({t['params']['lora_trainable']:,} LoRA-trainable).
LLM tokens per dataset token: {t['cost']['llm_tokens_per_dataset_token']:.2f}; training {t['cost']['train_tokens_per_s']:.0f} tokens/s;
evaluation {t['cost']['eval_users_per_s']:.1f} users/s.
Student: {report['student']['params']:,} parameters, trained {report['student']['train_seconds']:.0f} s
(best epoch {report['student']['best_epoch']}, stop: {report['student']['stop_reason']}); teacher soft labels cover
{100 * report['student']['teacher_coverage']:.1f}% of the student's training positions.
ONNX parity (max |diff| vs PyTorch): {report['parity']['max_abs_diff']} (passed: {report['parity']['passed']}).
"""
    atomic_write_text(out / "report.md", md)
    _plot(report, out / "latency.png")


def _plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in report["latency"].items():
        bs = sorted(int(b) for b in rows)
        ax.plot(bs, [rows[str(b)]["p50_ms"] for b in bs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (requests per call)")
    ax.set_ylabel("p50 latency per call (ms)")
    ax.set_title("Latency per call vs batch size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
