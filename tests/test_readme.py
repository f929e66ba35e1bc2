"""README figures come from a real run: the results block equals the rendering of the committed snapshot
(docs/results/cpu-default.json, written by `distillrec results runs/cpu-default --readme README.md`)."""
import json
from pathlib import Path

import pytest

from distillrec.results import BEGIN, END, ResultsError, readme_block, render, update_readme

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "docs" / "results" / "cpu-default.json"


def test_readme_results_block_matches_the_committed_run_snapshot():
    snap = json.loads(SNAPSHOT.read_text())
    assert readme_block((ROOT / "README.md").read_text()) == render(snap), (
        "README's results block differs from docs/results/cpu-default.json: rerun "
        "`distillrec results runs/cpu-default --readme README.md` after the default run")


def test_snapshot_holds_every_headline_row():
    snap = json.loads(SNAPSHOT.read_text())
    rows = snap["quality"]["rows"]
    assert list(rows) == ["teacher", "student (KD)", "student without KD", "popularity / item mean"]
    for row in rows.values():
        assert 0 < row["NDCG@10"]["value"] < 1 and row["NDCG@10"]["ci"][0] <= row["NDCG@10"]["value"]
    assert snap["quality"]["users"] == 943 and snap["stage_seconds"] and snap["latency_b1_h50"]


def test_update_readme_rewrites_only_the_block(tmp_path):
    snap = json.loads(SNAPSHOT.read_text())
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\nbefore\n{BEGIN}\nstale 0.999\n{END}\nafter\n")
    assert update_readme(readme, snap) is True
    text = readme.read_text()
    assert text.startswith("# title\nbefore\n") and text.endswith(f"{END}\nafter\n")
    assert readme_block(text) == render(snap) and "0.999" not in text
    assert update_readme(readme, snap) is False  # idempotent


def test_missing_markers_and_missing_report_are_named(tmp_path):
    from distillrec.results import snapshot
    with pytest.raises(ResultsError, match="results:begin"):
        readme_block("no markers here")
    with pytest.raises(ResultsError, match="bench/report.json not found"):
        snapshot(tmp_path)
