"""The installed (non-editable) package: build the wheel, install it into a fresh venv, and use it from outside
the repository -- the CLI, the presets by name and the shipped teacher must all be inside the install.

The new venv gets the dependencies from this interpreter's site-packages through a .pth line (the packages of
this repository are NOT on that path: they are editable installs whose finder is never loaded that way), so
only the wheel's own files can answer for distill / export / serve_bench / distillrec.
"""
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "configs", "distill", "export", "serve_bench", "distillrec"]
TEACHER = Path("distill") / "teachers"


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def _run(cmd, cwd, timeout=300) -> str:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (nothing is written into the repository)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "checkpoint"))
        else:
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src], cwd=src)
    (whl,) = dist.glob("distillrec-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    env = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", env], cwd=env)
    site = next((env / "lib").glob("python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # numpy, yaml, ...: not this repo
    _run([sys.executable, "-m", "pip", "--python", env / "bin" / "python", "install", "--no-deps", "-q", wheel]
         if _pip_has_python_option() else
         [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, wheel], cwd=env)
    return env


def _pip_has_python_option() -> bool:
    out = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True)
    major, minor = (int(x) for x in out.stdout.split()[1].split(".")[:2])
    return (major, minor) >= (22, 3)


def test_the_wheel_carries_the_presets_and_the_shipped_teacher(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {f"distillrec/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    teacher = {str(TEACHER / f) for f in _files(ROOT / TEACHER)}
    assert presets and presets <= names
    assert teacher and teacher <= names, sorted(teacher - names)
    assert "distillrec/cli.py" in names and "distill/config.py" in names and "export/config.py" in names
    assert not [n for n in names if n.startswith(("tests/", "runs/", "configs/"))]


def test_the_installed_package_runs_from_outside_the_repository(venv, tmp_path):
    py, cli = venv / "bin" / "python", venv / "bin" / "distillrec"
    assert "--from-stage" in _run([cli, "run", "--help"], cwd=tmp_path)
    assert "--from-stage" in _run([py, "-m", "distillrec", "run", "--help"], cwd=tmp_path)
    probe = ("import distill, distillrec, export, serve_bench; from pathlib import Path; "
             "from distillrec.config import load_config, preset_dir, preset_names; "
             "print(*[Path(m.__file__).parent for m in (distill, distillrec, export, serve_bench)], sep='\\n'); "
             "print(preset_dir()); print(','.join(preset_names())); "
             "print(load_config('cpu').teacher.init_from, load_config('configs/tiny.yaml').teacher.model)")
    lines = _run([py, "-c", probe], cwd=tmp_path).splitlines()
    site = next((venv / "lib").glob("python*/site-packages")).resolve()
    for folder in lines[:4]:  # every package comes from the install, none from the repository
        assert Path(folder).resolve().parent == site, folder
    assert Path(lines[4]).resolve() == site / "distillrec" / "configs"
    assert lines[5] == ",".join(sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")))
    assert lines[6] == "shipped tiny-random"
    assert _files(site / TEACHER) == _files(ROOT / TEACHER)  # the shipped teacher travels whole
    for p in (ROOT / "configs").glob("*.yaml"):
        assert (site / "distillrec" / "configs" / p.name).read_bytes() == p.read_bytes()


def test_an_installed_preset_starts_a_run(venv, tmp_path):
    """`distillrec data <run> --config tiny` from an empty folder: the packaged preset drives a real stage."""
    _run([venv / "bin" / "distillrec", "data", tmp_path / "w", "--config", "tiny"], cwd=tmp_path)
    assert (tmp_path / "w" / "config.yaml").exists() and (tmp_path / "w" / "data_stats.json").exists()
