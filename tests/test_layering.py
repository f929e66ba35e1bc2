"""Package layering, read from the source (ast; nothing is imported):

    distill (training)  <-  export (ONNX, runtime, service)  <-  serve_bench (benchmark)  <-  distillrec (CLI, config)

- an upstream package never imports a downstream one (at any depth: module level or inside a function);
- export takes from distill only what rebuilding a model for export needs (EXPORT_MAY_USE), never a training loop;
- a training loop (teacher_stage, student_stage) is imported only by the modules that drive it; shared helpers
  live in modules of their own;
- the serving modules and serve_bench are torch-free at import: no module-level import chain reaches torch
  (serve_bench imports torch inside the functions that measure a PyTorch system).
"""
import ast
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["distill", "export", "serve_bench", "distillrec"]
"""Upstream first: a package may import only the packages before it."""
EXPORT_MAY_USE = {"distill", "distill.student", "distill.teacher", "distill.mtl", "distill.io", "distill.config"}
"""distill modules export may import: the model classes it rebuilds (student, teacher, mtl), artifact I/O, the
config builder, and the package itself (its __version__)."""
LOOP_DRIVERS = {"distill.teacher_stage": {"distill.teacher_report"}, "distill.student_stage": {"distill.ablation"}}
"""Training loops and the distill modules allowed to run them (distillrec may import anything)."""
TORCH_FREE = ["export.runtime", "export.providers", "export.service", "export.triton", "export.contract",
              "export.retrieval", "export.item_table", "export.batching", "export.triton_model",
              "serve_bench.*"]
"""Modules whose import must not load torch."""
TORCH_LIBS = {"torch", "transformers", "peft", "optimum", "accelerate", "torchvision", "safetensors.torch"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in LAYERS for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom, alias: str) -> str:
    """The module an ImportFrom names: `from . import metrics` -> distill.metrics; `from .cache import x` ->
    distill.cache; `from export import contract` -> export.contract (a submodule when one exists)."""
    if node.level:
        is_pkg = _modules()[module].name == "__init__.py"
        base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module
    sub = f"{target}.{alias}"
    return sub if sub in _modules() else target


def _imports(module: str, module_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) of every import in `module`; with module_level_only, only those that run when the
    module is imported (not inside functions, not under `if TYPE_CHECKING:`)."""
    tree = ast.parse(_modules()[module].read_text())
    out = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if module_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if (module_level_only and isinstance(child, ast.If) and isinstance(child.test, ast.Name)
                    and child.test.id == "TYPE_CHECKING"):
                continue
            if isinstance(child, ast.Import):
                out.extend((child.lineno, a.name) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                out.extend((child.lineno, _resolve(module, child, a.name)) for a in child.names)
            visit(child)

    visit(tree)
    return out


def _package(name: str) -> str:
    return name.split(".")[0]


def _selected(patterns: list[str]) -> list[str]:
    return sorted(m for m in _modules() for p in patterns
                  if m == p or (p.endswith(".*") and _package(m) == p[:-2] and m != p[:-2]))


def test_the_scan_sees_every_package():
    assert {_package(m) for m in _modules()} == set(LAYERS)
    assert ("distill.cache" in _modules() and "export.runtime" in _modules()
            and "distillrec.cli" in _modules())
    assert any(m == "distill.metrics" for _, m in _imports("distill.evaluation"))  # `from . import metrics as M`
    assert not any(m == "torch" for _, m in _imports("distill.common", module_level_only=True))  # lazy imports skipped


def test_no_upstream_package_imports_a_downstream_one():
    bad = []
    for module in _modules():
        rank = LAYERS.index(_package(module))
        for line, target in _imports(module):
            if _package(target) in LAYERS and LAYERS.index(_package(target)) > rank:
                bad.append(f"{_modules()[module].relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "upstream imports downstream:\n  " + "\n  ".join(bad)


def test_export_takes_from_distill_only_what_rebuilding_a_model_needs():
    bad = [f"{_modules()[m].relative_to(ROOT)}:{line} imports {t}"
           for m in _selected(["export.*"]) for line, t in _imports(m)
           if _package(t) == "distill" and t not in EXPORT_MAY_USE]
    assert not bad, f"export may use only {sorted(EXPORT_MAY_USE)} from distill:\n  " + "\n  ".join(bad)


def test_training_loops_are_imported_only_by_their_drivers():
    bad = [f"{_modules()[m].relative_to(ROOT)}:{line} imports {t} (helpers belong in a shared module)"
           for m in _modules() if _package(m) != "distillrec" for line, t in _imports(m)
           if t in LOOP_DRIVERS and m != t and m not in LOOP_DRIVERS[t]]
    assert not bad, "\n  ".join(["a training loop imported by a non-driver:", *bad])


def _torch_chain(module: str, seen: set) -> list[str] | None:
    """The module-level import chain from `module` to a torch library, or None."""
    seen.add(module)
    for line, target in _imports(module, module_level_only=True):
        if target in TORCH_LIBS or _package(target) in TORCH_LIBS:
            return [f"{module}:{line}", target]
        parts = target.split(".")
        for loaded in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):  # a.b.c runs a, a.b and a.b.c
            if loaded in _modules() and loaded not in seen:
                chain = _torch_chain(loaded, seen)
                if chain:
                    return [f"{module}:{line}", *chain]
    return None


@pytest.mark.parametrize("module", _selected(TORCH_FREE))
def test_serving_and_bench_modules_do_not_load_torch_at_import(module):
    chain = _torch_chain(module, set())
    assert chain is None, f"importing {module} loads torch: {' -> '.join(chain)}"
