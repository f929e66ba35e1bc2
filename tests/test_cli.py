"""CLI plumbing: where a stage writes."""
from pathlib import Path

import yaml

from distill.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_data_stage_writes_to_the_positional_run_folder(tmp_path, monkeypatch):
    """`distillrec data <run> --config x.yaml` must start <run>, not the folder that x.yaml's out_dir/name
    name (which would silently overwrite another run's config)."""
    monkeypatch.chdir(tmp_path)  # configs/tiny.yaml's own out_dir is relative: it would land under tmp_path/
    run = tmp_path / "mine"
    assert main(["data", str(run), "--config", str(ROOT / "configs" / "tiny.yaml")]) == 0
    assert (run / "config.yaml").exists() and (run / "data_stats.json").exists()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["out_dir"], cfg["name"]) == (str(tmp_path), "mine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # nothing written elsewhere
