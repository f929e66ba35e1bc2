"""CLI plumbing: the subcommand table, where a stage writes, config errors at the command line."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distillrec.cli import COMMANDS, STAGES, _config_for_run, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
SUBCOMMANDS = {"run", *STAGES, "teacher-weighting", "ablate", "teacher-curves", "ship-teacher", "loadtest", "serve",
               "triton", "results", "add-items", "remove-items", "scale-bench", "growth", "synth", "explain", "query"}


def test_the_parser_is_built_from_the_table():
    assert set(COMMANDS) == SUBCOMMANDS
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    assert list(sub.choices) == list(COMMANDS)  # every table row is a subcommand, in table order
    for name, command in COMMANDS.items():
        assert sub.choices[name].get_default("handler") is command.handler
        assert command.help and sub.choices[name].description == command.help


@pytest.mark.parametrize("argv, expect", [
    (["run", "--config", "cpu", "-o", "student.lr=4e-3", "--to-stage", "teacher"],
     dict(config="cpu", override=["student.lr=4e-3"], from_stage="data", to_stage="teacher")),
    (["teacher", "runs/x", "-o", "teacher.max_steps=3"], dict(run_dir="runs/x", override=["teacher.max_steps=3"])),
    (["serve", "runs/x", "--port", "9000", "--providers", "cuda", "cpu", "--empty-history", "popularity"],
     dict(run_dir="runs/x", port=9000, providers=["cuda", "cpu"], empty_history="popularity", workers=1)),
    (["triton", "runs/x", "--gpu", "--max-batch-size", "64"], dict(gpu=True, max_batch_size=64, instances=None)),
    (["teacher-weighting", "runs/x", "--steps", "5"], dict(steps=5, strategies="fixed,uncertainty,gradnorm,dwa")),
    (["teacher-curves", "runs/a", "runs/b"], dict(run_dirs=["runs/a", "runs/b"], out="teacher_curves")),
    (["loadtest", "runs/x", "--seconds", "2.5"], dict(clients=8, seconds=2.5)),
    (["ship-teacher", "runs/x"], dict(to=None)),
])
def test_flags_parse_as_before(argv, expect):
    args = build_parser().parse_args(argv)
    assert {k: getattr(args, k) for k in expect} == expect
    assert args.handler is COMMANDS[argv[0]].handler


def test_bad_flag_values_are_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--config", "cpu", "--to-stage", "deploy"])
    assert "invalid choice: 'deploy'" in capsys.readouterr().err


def test_ablate_leaves_the_bench_report_to_the_bench():
    """`ablate` writes ablation/report.*; it must not reach into serve_bench (the bench reads the ablation)."""
    tree = ast.parse((ROOT / "distillrec" / "cli.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "cmd_ablate")
    names = {n.module for n in ast.walk(fn) if isinstance(n, ast.ImportFrom)}
    assert names == {"distill.ablation", "distill.common"}


def test_python_dash_m_distillrec_works():
    out = subprocess.run([sys.executable, "-m", "distillrec", "run", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--from-stage" in out.stdout and "preset" in out.stdout


def test_data_stage_writes_to_the_positional_run_folder(tmp_path, monkeypatch):
    """`distillrec data <run> --config x.yaml` must start <run>, not the folder that x.yaml's out_dir/name
    name (which would silently overwrite another run's config)."""
    monkeypatch.chdir(tmp_path)  # configs/tiny.yaml's own out_dir is relative: it would land under tmp_path/
    run = tmp_path / "mine"
    assert main(["data", str(run), "--config", TINY]) == 0
    assert (run / "config.yaml").exists() and (run / "data_stats.json").exists()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["out_dir"], cfg["name"]) == (str(tmp_path), "mine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # nothing written elsewhere
    # the whole pipeline config is written: distill's sections, the downstream ones and the provenance
    assert {"data", "teacher", "student", "export", "bench", "_meta"} <= set(cfg)


def test_a_preset_name_starts_a_run_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: 'tiny' must resolve to the packaged preset
    run = tmp_path / "p"
    assert main(["data", str(run), "--config", "tiny", "-o", "student.lr=4e-3"]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["teacher"]["model"] == "tiny-random" and cfg["student"]["lr"] == 0.004  # '4e-3' coerced to a float


def test_a_bad_override_is_a_one_line_error_naming_the_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"student\.lr: expected a float, got 'abc'"):
        main(["data", str(tmp_path / "bad"), "--config", TINY, "-o", "student.lr=abc"])
    with pytest.raises(SystemExit, match=r"student\.mtl='moe': choose one of 'shared_bottom', 'mmoe', 'ple'"):
        main(["run", "--config", TINY, "-o", "student.mtl=moe"])
    with pytest.raises(SystemExit, match="neither a file nor a preset; presets: cpu, gpu"):
        main(["run", "--config", "cpu-fast"])
    assert not (tmp_path / "bad").exists() and not (tmp_path / "runs").exists()  # nothing written


def test_overrides_on_an_existing_run_write_nothing(tmp_path, monkeypatch):
    """Every DDP rank reads the run's config with the same overrides at once: no shared temporary file
    (two ranks once raced on one and a rank died with FileNotFoundError)."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "mine"
    assert main(["data", str(run), "--config", TINY]) == 0
    before = sorted(p.name for p in run.iterdir())
    cfg = _config_for_run(str(run), ["teacher.max_steps=7", "student.ablation_seeds=[3, 4]", "bench.warmup=0"])
    assert cfg.teacher.max_steps == 7 and list(cfg.student.ablation_seeds) == [3, 4] and cfg.bench.warmup == 0
    assert (cfg.out_dir, cfg.name) == (str(tmp_path), "mine")
    assert sorted(p.name for p in run.iterdir()) == before
    assert _config_for_run(str(run), []).teacher.max_steps != 7  # the run's config itself is untouched
    with pytest.raises(SystemExit, match=r"config.yaml: export.opset: expected an integer, got 'twenty'"):
        _config_for_run(str(run), ["export.opset=twenty"])


def test_a_stage_without_a_run_folder_says_how_to_start_one(tmp_path):
    with pytest.raises(SystemExit, match="needs a run folder"):
        main(["teacher"])
    with pytest.raises(SystemExit, match="distillrec run --config"):
        main(["student", str(tmp_path / "nothing")])
