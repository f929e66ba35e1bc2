"""`distillrec growth`: the slope fit, the report built from measured rows, and (slow) a real two-size sweep."""
import json

import numpy as np
import pytest

from distillrec.growth import STAGES, fit_slope, markdown, slopes


def test_slope_of_a_power_law_is_its_exponent():
    n = np.array([1e5, 1e6, 1e7])
    assert fit_slope(n, 3e-6 * n ** 1.0) == pytest.approx(1.0)
    assert fit_slope(n, 2.0 * n ** 0.5) == pytest.approx(0.5)
    assert fit_slope(n, 5 + 0 * n) == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(fit_slope([1e5], [1.0]))  # one point: no slope


def _rows():
    rows = []
    for n in (10_000, 100_000, 1_000_000):
        for stage in STAGES:
            r = dict(stage=stage, n=n, seconds=1e-5 * n * (1.5 if stage == "student" else 1.0), peak_mb=500 + n / 1e4,
                     base_mb=300.0)
            if stage == "cache":
                r["labelled"] = n // 50
                r["seconds"] = 1e-3 * r["labelled"]
                r["labelling_seconds"] = 0.5e-3 * r["labelled"]
            if stage == "export":
                r["seconds"] = 40.0
            if stage == "student":
                r.update(setup_seconds=1.0, train_seconds=0.9e-5 * n, val_seconds=0.1, steps=n // 1000)
            rows.append(r)
    return rows


def test_slopes_are_fitted_per_stage_against_its_own_work():
    s = slopes(_rows())
    assert s["data"]["time"] == pytest.approx(1.0) and s["cache"]["time"] == pytest.approx(1.0)  # per labelled row
    assert s["export"]["time"] == pytest.approx(0.0, abs=1e-9) and s["student"]["train_pass"] == pytest.approx(1.0)
    assert s["data"]["time_top"] == pytest.approx(1.0) and s["cache"]["labelling"] == pytest.approx(1.0)
    above = [200 + n / 1e4 for n in (1e4, 1e5, 1e6)]  # peak - base
    assert s["data"]["memory"] == pytest.approx(fit_slope([1e4, 1e5, 1e6], above))


def test_report_tabulates_every_stage_and_size():
    rows = _rows()
    md = markdown(dict(items=20_000, per_user=50, cache_share=0.02, threads=2, rows=rows, slopes=slopes(rows),
                       sizes=[10_000, 100_000, 1_000_000]))
    table = [line for line in md.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in STAGES]
    assert len(table) == 3 * len(STAGES) + len(STAGES)  # a row per (stage, size), then a slope row per stage
    assert "| cache | 1,000,000 | 20,000 | 20.00 | 1000.00 |" in md
    assert "Data stage at 1,000,000 interactions" in md


def test_stage_peak_is_the_process_own_not_its_parents():
    """A stage process started by a parent that once held 400 MB reports its own peak (VmHWM); ru_maxrss would
    report the parent's, carried over fork + exec."""
    import subprocess
    import sys
    from distillrec.growth import _peak_mb
    block = np.ones(400 * 2**20 // 8)  # 400 MB touched by the parent
    parent = _peak_mb()
    child = subprocess.run([sys.executable, "-c", "from distillrec.growth import _peak_mb; print(_peak_mb())"],
                           capture_output=True, text=True, check=True)
    assert parent >= block.nbytes / 2**20
    assert float(child.stdout) < parent - 300
    del block


@pytest.mark.slow
def test_a_two_size_sweep_runs_every_stage(tmp_path):
    from distillrec.growth import sweep
    rep = sweep([2_000, 8_000], items=300, per_user=40, cache_share=0.1, out=tmp_path, threads=1)
    assert {r["stage"] for r in rep["rows"]} == set(STAGES) and len(rep["rows"]) == 8
    assert (tmp_path / "growth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = [r for r in rep["rows"] if r["stage"] == "data"]
    assert [r["interactions"] for r in data] == [2_000, 8_000]
    assert json.loads((tmp_path / "growth.json").read_text())["sizes"] == [2_000, 8_000]
