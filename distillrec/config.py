"""The pipeline config: distill's run (data, teacher, student) + the export and bench sections, and the presets.

    from distillrec.config import load_config
    cfg = load_config("cpu", ["student.lr=4e-3"])   # a preset name, or a path to a YAML file
    cfg.teacher.max_steps, cfg.export.opset, cfg.bench.batch_sizes

This is the only config module that knows every section: distill knows its own (distill/config.py), export and
serve_bench theirs (export/config.py, serve_bench/config.py); all of them are built by distill's validating builder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from distill.config import META_KEY, RunConfig, apply_overrides, build_config, read_yaml
from export.config import ExportConfig
from serve_bench.config import BenchConfig


@dataclass
class PipelineConfig(RunConfig):
    """A whole run: distill's sections + export + bench (the schema of configs/*.yaml and runs/<name>/config.yaml)."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """ONNX export of the students (and the teacher): opset, parity tolerance, variants, providers."""
    bench: BenchConfig = field(default_factory=BenchConfig)
    """The latency/quality benchmark: request sets, batch sizes, repetitions, caps, load test."""


def config_from_dict(values: Optional[dict]) -> PipelineConfig:
    """Every section validated; the _meta block of a run's config.yaml is ignored."""
    return build_config(PipelineConfig, values or {}, "", ignore=(META_KEY,))


# ----------------------------------------------------------------------------- presets
def preset_dir() -> Path:
    """The preset YAML folder: distillrec/configs inside an installed wheel (pyproject maps the repository's
    configs/ there), the repository's configs/ in a source checkout or an editable install."""
    packaged = Path(__file__).parent / "configs"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def resolve_config_path(path_or_preset: str | Path) -> Path:
    """An existing file as given; else a preset: 'cpu', 'cpu.yaml' or 'configs/cpu.yaml' (the README's path,
    which also works from an installed package outside the repository)."""
    path = Path(path_or_preset)
    if path.is_file():
        return path
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    is_preset_form = path.parent in (Path("."), Path("configs")) and path.suffix in ("", ".yaml")
    if is_preset_form and (preset_dir() / f"{stem}.yaml").is_file():
        return preset_dir() / f"{stem}.yaml"
    raise FileNotFoundError(f"config {str(path_or_preset)!r} is neither a file nor a preset; presets: "
                            f"{', '.join(preset_names())} (in {preset_dir()}), e.g. `distillrec run --config cpu`")


def load_config(path_or_preset: str | Path, overrides: Optional[list[str]] = None) -> PipelineConfig:
    """Read a YAML file or a preset; `overrides` are 'section.key=value' strings (value parsed as YAML)."""
    return config_from_dict(apply_overrides(read_yaml(resolve_config_path(path_or_preset)), overrides))
