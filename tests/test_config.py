"""Config validation: types coerced or rejected with the field's full name, choices, cross-field rules, every
field documented, every preset valid, one source of defaults, presets found by name."""
import ast
import dataclasses
import inspect
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

import distill.config as dc
from distill.config import (ConfigError, DataConfig, RunConfig, StudentConfig, TeacherConfig, apply_overrides,
                            config_to_dict)
from distillrec.config import (PipelineConfig, config_from_dict, load_config, preset_dir, preset_names,
                               resolve_config_path)
from export.config import ExportConfig, export_config_from_run
from serve_bench.config import BenchConfig, bench_config_from_run

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
SECTIONS = {"data": DataConfig, "teacher": TeacherConfig, "student": StudentConfig, "export": ExportConfig,
            "bench": BenchConfig}
CLASSES = [RunConfig, PipelineConfig, *SECTIONS.values()]


def _with(overrides: list[str], base: str = "tiny") -> PipelineConfig:
    return load_config(base, overrides)


def _documented(cls) -> set[str]:
    """Field names that have an attribute docstring (a string right after the annotated assignment) in the class
    that declares them."""
    out = set()
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str) and nxt.value.value.strip()):
                out.add(stmt.target.id)
    return out


# ----------------------------------------------------------------------------- documentation and presets
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(cls):
    missing = sorted({f.name for f in dataclasses.fields(cls)} - _documented(cls))
    assert not missing, f"{cls.__name__}: fields without an attribute docstring: {missing}"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_key_is_a_documented_field_and_the_preset_validates(path):
    raw = yaml.safe_load(path.read_text())
    top = {f.name for f in dataclasses.fields(PipelineConfig)}
    for key, value in raw.items():
        assert key in top, f"{path.name}: '{key}' is not a field of PipelineConfig"
        if key in SECTIONS:
            known = _documented(SECTIONS[key])
            assert not sorted(set(value) - known), f"{path.name}: {key}.{sorted(set(value) - known)} undocumented"
    cfg = load_config(path)
    assert cfg.name == raw["name"]
    for key, value in raw.items():  # every value arrives (numbers may be coerced, e.g. int -> int, '1e3' -> 1000)
        if key in SECTIONS:
            for k, v in value.items():
                assert getattr(getattr(cfg, key), k) == v, f"{path.name}: {key}.{k}"
    assert isinstance(dc.load_config(path), RunConfig)  # distill alone reads the same file (downstream left out)


def test_cpu_preset_says_why_it_differs_from_each_default():
    """One source of defaults: where configs/cpu.yaml departs from the dataclass default, its line says why."""
    path = ROOT / "configs" / "cpu.yaml"
    defaults, raw = PipelineConfig(), yaml.safe_load(path.read_text())
    lines = path.read_text().splitlines()
    undocumented = []
    for section, values in raw.items():
        if section not in SECTIONS:
            continue
        line_of = {}
        in_section = False
        for line in lines:
            if not line.startswith(" "):
                in_section = line.startswith(f"{section}:")
            elif in_section:
                line_of.setdefault(line.strip().split(":", 1)[0], line)
        for key, value in values.items():
            if getattr(getattr(defaults, section), key) != value and "#" not in line_of[key]:
                undocumented.append(f"{section}.{key}")
    assert not undocumented, f"configs/cpu.yaml differs from the default without a comment: {undocumented}"


def test_presets_resolve_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert set(preset_names()) == {p.stem for p in PRESETS}
    for given in ("cpu", "cpu.yaml", "configs/cpu.yaml"):
        assert resolve_config_path(given) == preset_dir() / "cpu.yaml"
    assert load_config("gpu").device == "cuda"
    own = tmp_path / "cpu.yaml"  # an existing file wins over the preset of the same name
    own.write_text("name: mine\n")
    assert load_config("cpu.yaml").name == "mine" and load_config("cpu").name == "cpu-default"
    with pytest.raises(FileNotFoundError, match="presets: cpu, gpu, teacher-cpu, teacher-text-cpu, tiny"):
        load_config("cpu-fast")
    with pytest.raises(FileNotFoundError, match="neither a file nor a preset"):
        load_config("elsewhere/cpu.yaml")


# ----------------------------------------------------------------------------- coercion and rejection
def test_numeric_strings_are_coerced():
    cfg = _with(["student.lr=4e-3", "teacher.max_steps=1e3", "teacher.time_budget_s='90'", "export.parity_tol=1e-5"])
    assert cfg.student.lr == 0.004 and isinstance(cfg.student.lr, float)
    assert cfg.teacher.max_steps == 1000 and type(cfg.teacher.max_steps) is int
    assert cfg.teacher.time_budget_s == 90.0 and cfg.export.parity_tol == 1e-5
    assert StudentConfig(lr="2e-3").lr == 0.002  # the same rules in code
    assert type(load_config("cpu").student.time_budget_s) is int  # ints stay ints in float fields (fingerprints)


@pytest.mark.parametrize("override, message", [
    ("student.lr=abc", "student.lr: expected a float, got 'abc'"),
    ("student.epochs=2.5", "student.epochs: expected an integer, got 2.5"),
    ("student.epochs=true", "student.epochs: expected an integer, got True"),
    ("student.lr=true", "student.lr: expected a float, got True"),
    ("student.kd_guard=1", "student.kd_guard: expected true or false, got 1"),
    ("teacher.model=3", "teacher.model: expected a string, got 3"),
    ("teacher.init_from=3", "teacher.init_from: expected a string, got 3"),
    ("student.ablation_seeds=[0, x]", r"student.ablation_seeds\[1\]: expected an integer, got 'x'"),
    ("export.providers=cpu", r"export.providers: expected a list of strings \(\[a, b\]\), got 'cpu'"),
    ("teacher.loss_weights={next_item: heavy}", "teacher.loss_weights.next_item: expected a float, got 'heavy'"),
    ("data=ml-100k", "data: expected a mapping|config section 'data' must be a mapping"),
])
def test_wrong_types_are_rejected_with_the_full_field_name(override, message):
    with pytest.raises(ConfigError, match=message):
        _with([override])


@pytest.mark.parametrize("override, message", [
    ("student.mtl=moe", "student.mtl='moe': choose one of 'shared_bottom', 'mmoe', 'ple'"),
    ("student.kd_scope=all", "student.kd_scope='all': choose one of 'auto', 'topk', 'catalog'"),
    ("student.align_loss=l1", "student.align_loss='l1'"),
    ("student.lr_schedule=linear", "student.lr_schedule='linear'"),
    ("student.weighting=magic", "student.weighting='magic': choose one of 'fixed', 'uncertainty', 'gradnorm', 'dwa'"),
    ("teacher.weighting=DWA", "teacher.weighting='DWA'"),
    ("teacher.input=tokens", "teacher.input='tokens'"),
    ("teacher.amp=fp8", "teacher.amp='fp8'"),
    ("data.source=json", "data.source='json': choose one of 'ml-100k', 'grouplens', 'csv', 'parquet'"),
    ("export.variants=[opt, int4]", r"export.variants\[1\]='int4': choose one of 'opt', 'int8', 'fp16'"),
    ("bench.variants=[fp64]", r"bench.variants\[0\]='fp64'"),
])
def test_choices_are_checked_when_the_config_is_built(override, message):
    with pytest.raises(ConfigError, match=message):
        _with([override])


@pytest.mark.parametrize("override, message", [
    ("student.dim=33", "student.dim=33: must be divisible by student.heads=2"),
    ("student.kd_alpha=1.5", r"student.kd_alpha=1.5: must be in \[0, 1\]"),
    ("student.dropout=1.0", r"student.dropout=1.0: must be in \[0, 1\)"),
    ("student.epochs=0", "student.epochs=0: must be >= 1"),
    ("student.temperature=0", "student.temperature=0: must be > 0"),
    ("student.loss_weights={next_item: 1, clicks: 1}", r"student.loss_weights=.*unknown task\(s\) \['clicks'\]"),
    ("teacher.layers=0", "teacher.layers=0: a number of decoder layers >= 1"),
    ("teacher.eval_users=0", r"teacher.eval_users=0: must be >= 1 \(or null\)"),
    ("teacher.warmup_frac=1", r"teacher.warmup_frac=1: must be in \[0, 1\)"),
    ("teacher.checkpoint_every=0", "teacher.checkpoint_every=0: must be >= 1"),
    ("device=gpu", "device='gpu': use auto, cpu, cuda, cuda:N or mps"),
    ("threads=0", "threads=0: must be >= 1"),
    ("export.providers=[tpu]", "export.providers=.*'tpu' is not a provider"),
    ("export.providers=[]", "export.providers=.*at least one"),
    ("bench.batch_sizes=[0, 8]", "bench.batch_sizes=.*every size >= 1"),
    ("bench.max_seconds=1", "bench.max_seconds=1: must be >= bench.min_seconds"),
])
def test_cross_field_and_range_rules(override, message):
    with pytest.raises(ConfigError, match=message):
        _with([override], base="cpu")


def test_optional_fields_take_null_and_valid_edge_values():
    cfg = _with(["teacher.layers=null", "teacher.eval_users=None", "bench.teacher_batch_sizes=null", "device=cuda:1",
                 "student.kd_alpha=1", "student.ablation_variants=[kd_full, no_kd]"])
    assert cfg.teacher.layers is None and cfg.teacher.eval_users is None and cfg.bench.teacher_batch_sizes is None
    assert cfg.device == "cuda:1" and cfg.student.kd_alpha == 1
    assert cfg.student.ablation_variants == ["kd_full", "no_kd"]


def test_replace_and_direct_construction_validate_too():
    with pytest.raises(ConfigError, match="student.mtl='moe'"):
        replace(StudentConfig(), mtl="moe")
    with pytest.raises(ConfigError, match="student.lr: expected a float"):
        StudentConfig(lr="fast")
    with pytest.raises(ConfigError, match="export.opset: expected an integer"):
        ExportConfig(opset="latest")
    with pytest.raises(ConfigError, match="bench.n_requests=0"):
        BenchConfig(n_requests=0)
    with pytest.raises(ConfigError, match=r"data.user_col: expected a string"):
        RunConfig(data={"user_col": 1})
    assert RunConfig(data={"source": "csv", "path": "log.csv"}).data.path == "log.csv"  # a mapping builds a section


def test_unknown_keys_are_errors_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['temprature'\] in config section 'student' "
                                          r"\(did you mean 'temprature' -> 'temperature'\?\); valid keys: \["):
        _with(["student.temprature=2"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['studnet'\] in config section 'top level' "
                                          r"\(did you mean 'studnet' -> 'student'\?\)"):
        _with(["studnet.lr=0.1"])
    with pytest.raises(ConfigError, match="override 'student.lr' must look like section.key=value"):
        apply_overrides({}, ["student.lr"])


# ----------------------------------------------------------------------------- layering of the sections
def test_distill_reads_its_sections_and_leaves_downstream_ones_to_their_packages():
    values = config_to_dict(load_config("cpu"))
    values["_meta"] = {"seed": 0}
    values["export"]["opset"] = "not checked by distill"
    run = dc.config_from_dict(values)
    assert type(run) is RunConfig and not hasattr(run, "export") and run.teacher.layers == 8
    with pytest.raises(ConfigError, match="export.opset: expected an integer"):
        config_from_dict(values)  # the pipeline config checks every section
    with pytest.raises(ConfigError, match="export.opset: expected an integer"):
        export_config_from_run(values)
    values["export"]["opset"] = 20
    assert export_config_from_run(values) == load_config("cpu").export
    assert bench_config_from_run(values).concurrency == [1, 4]
    assert bench_config_from_run({}) == BenchConfig() and export_config_from_run(None) == ExportConfig()
    values["student"]["mtl"] = "moe"
    with pytest.raises(ConfigError, match="student.mtl='moe'"):
        dc.config_from_dict(values)  # distill's own sections stay checked
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['serving'\]"):
        dc.config_from_dict({"serving": {}})  # only the known downstream sections are left out


def test_pipeline_config_round_trips_through_its_dict():
    cfg = load_config("cpu", ["student.lr=4e-3"])
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg))))
    assert again == cfg and isinstance(again.export, ExportConfig) and isinstance(again.bench, BenchConfig)
    assert PipelineConfig().export == ExportConfig() and PipelineConfig().run_dir == Path("runs/default")
