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


def test_overrides_on_an_existing_run_write_nothing(tmp_path, monkeypatch):
    """Every DDP rank reads the run's config with the same overrides at once: no shared temporary file
    (two ranks once raced on one and a rank died with FileNotFoundError)."""
    from distill.cli import _config_for_run
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "mine"
    assert main(["data", str(run), "--config", str(ROOT / "configs" / "tiny.yaml")]) == 0
    before = sorted(p.name for p in run.iterdir())
    cfg = _config_for_run(str(run), ["teacher.max_steps=7", "student.ablation_seeds=[3, 4]"])
    assert cfg.teacher.max_steps == 7 and list(cfg.student.ablation_seeds) == [3, 4]
    assert (cfg.out_dir, cfg.name) == (str(tmp_path), "mine")
    assert sorted(p.name for p in run.iterdir()) == before
    assert _config_for_run(str(run), []).teacher.max_steps != 7  # the run's config itself is untouched
