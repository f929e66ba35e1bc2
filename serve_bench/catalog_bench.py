"""How long a catalog update takes: N new items through `distillrec add-items`, served by a running Recommender.

    python -m serve_bench.catalog_bench runs/cpu-default --items 1000

Works on a temporary copy of the run (config, teacher, student, onnx/), so the run's served table is untouched.
The new items are real ML-style titles: sequels of random catalog items ("<title> II", the year + 1), so their
text is realistic and their vectors land among the catalog's. Measured, in one process:
  - end-to-end seconds from the command's start until a Recommender that was serving before has reloaded
    the new version (the issue's target: 1,000 items in <= 60 s on CPU);
  - the command's own step timings (read, text vectors, rows + publish);
  - the largest change of any OLD item's score for a sample of real users (target <= 1e-6; the old rows are
    copied, so it is 0.0), and how many of those users get a new item in their top 10.
Writes <run>/bench/catalog/report.json. Runs `python -m distillrec` in a subprocess (as a user would; this
package never imports the orchestration layer).
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

COPY = ("config.yaml", "student", "teacher", "onnx")
"""What add-items reads from a run (the teacher for text vectors, the student for rows, onnx/ for the table)."""


PREFIX = "bench-new-"
"""Ids of the new items: PREFIX + a number, never an id of the catalog (checked)."""


def _sequel_rows(item_text: list[str], n: int, seed: int) -> list[tuple[str, str, str]]:
    """(id, title, release_year) of n new items: sequels of random catalog items (text "<title> (<year>)")."""
    rng = np.random.default_rng(seed)
    rows = []
    for j, x in enumerate(rng.choice(len(item_text), n, replace=n > len(item_text))):
        title, _, year = item_text[x].rpartition(" (")
        year = year.rstrip(")")
        rows.append((f"{PREFIX}{j}", f"{title or item_text[x]} II", str(int(year) + 1) if year.isdigit() else "2026"))
    return rows


def run_catalog_bench(run_dir, n_items: int = 1000, users: int = 100, seed: int = 0, keep: bool = False) -> dict:
    import yaml

    from distill.config import DataConfig, build_config
    from distill.data import load_dataset
    from export.runtime import Recommender
    run_dir = Path(run_dir)
    cfg = build_config(DataConfig, yaml.safe_load((run_dir / "config.yaml").read_text())["data"], "data")
    if len(cfg.item_text_cols) != 1:
        raise ValueError(f"the catalog bench writes one text column; this run reads {cfg.item_text_cols}")
    ds = load_dataset(cfg)
    tmp = Path(tempfile.mkdtemp(prefix="catalog_bench_"))
    try:
        work = tmp / run_dir.name
        work.mkdir()
        for name in COPY:
            src = run_dir / name
            (shutil.copytree if src.is_dir() else shutil.copyfile)(src, work / name)
        items_csv = tmp / "new_items.csv"
        with open(items_csv, "w", newline="") as f:
            w = csv.writer(f)
            # release_year: ML-100K runs built their texts as "<title> (<year>)" (distillrec/catalog.py)
            w.writerow([cfg.item_id_col, cfg.item_text_cols[0], "release_year"])
            w.writerows(_sequel_rows(ds.item_text, n_items, seed))
        rec = Recommender(work / "onnx")
        if any(i.startswith(PREFIX) for i in rec.item_ids):
            raise ValueError(f"{run_dir / 'onnx'} already holds {PREFIX}* items; remove them first")
        pick = np.random.default_rng(seed).choice(ds.n_users, min(users, ds.n_users), replace=False)
        hist = [[str(ds.item_ids[i]) for i in ds.items[u][-rec.max_history:]] for u in pick]
        before = rec.predict_arrays(*rec.encode_histories(hist))["next_item_scores"]
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "distillrec", "add-items", str(work), str(items_csv)],
                              capture_output=True, text=True)
        t_cmd = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"add-items failed: {proc.stderr[-2000:]}")
        reloaded = rec.reload()
        t_served = time.perf_counter() - t0
        after = rec.predict_arrays(*rec.encode_histories(hist))["next_item_scores"]
        n_old = before.shape[1]
        top = rec.recommend_batch(hist, k=10)
        steps = json.loads(proc.stdout[:proc.stdout.rindex("}") + 1])["seconds"]
        report = {"items_added": n_items, "catalog_before": n_old, "catalog_after": rec.n_items,
                  "end_to_end_seconds": round(t_served, 2), "command_seconds": round(t_cmd, 2), "steps": steps,
                  "reloaded": reloaded, "table_version": rec.table_version,
                  "old_scores_max_abs_change": float(np.max(np.abs(after[:, :n_old] - before))),
                  "users_checked": len(hist),
                  "users_with_a_new_item_in_top10": int(sum(any(i.startswith(PREFIX) for i, _ in r) for r in top)),
                  "targets": {"end_to_end_seconds_max": 60, "old_scores_max_abs_change_max": 1e-6}}
        report["passed"] = report["end_to_end_seconds"] <= 60 and report["old_scores_max_abs_change"] <= 1e-6
        out = run_dir / "bench" / "catalog"
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        return report
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--users", type=int, default=100, help="real users whose old-item scores are compared")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(json.dumps(run_catalog_bench(args.run_dir, args.items, args.users, args.seed), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
