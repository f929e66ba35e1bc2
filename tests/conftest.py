"""Shared test setup: offline environment, the `slow` / `gpu` opt-in markers, and the fixtures more than one test
module needs (ML-100K split, a free TCP port, a tiny exported serving model). A fixture lives here as soon as a
second test file needs it; a test file never imports another test file."""
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

# Tests are offline by construction: tiny random models, the ML-100K copy in the recbole wheel.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

def pytest_sessionfinish(session, exitstatus):
    # `pytest -m <marker>` on a machine where nothing matches collects no test (exit 5): not a failure
    if exitstatus == 5:
        session.exitstatus = 0


# ----------------------------------------------------------------------------- network
@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago (the one implementation is the load
    test's: serve_bench.loadtest.free_port)."""
    from serve_bench.loadtest import free_port as pick
    return pick()


# ----------------------------------------------------------------------------- data
@pytest.fixture(scope="session")
def ml100k():
    """The real ML-100K Dataset (943 users, 1,682 items), loaded once per session; skips without recbole."""
    from distill.config import DataConfig
    from distill.data import DataError, load_dataset
    try:
        return load_dataset(DataConfig())
    except DataError as e:  # the recbole wheel (the data file) is not installed
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def ml100k_split(ml100k):
    """The protocol's leave-last-out split of ML-100K (read-only: shared by every test of the session)."""
    from distill.data import Split
    return Split.leave_last_out(ml100k)


# ----------------------------------------------------------------------------- a tiny exported serving model
@dataclass(frozen=True)
class ServingExport:
    """A real exported runtime folder of a tiny random student, and the catalog it was exported with."""
    onnx_dir: Path  # onnx/ folder: student.onnx + runtime.json (+ the variants it was exported with)
    item_ids: list  # raw item ids in model order ("m100", "m101", ...)
    popularity: list  # runtime.json item_popularity, aligned with item_ids
    max_history: int  # the model's max_history (runtime.json)
    text_dim: int  # width of the random item text vectors

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


SERVING_N_ITEMS, SERVING_TEXT_DIM, SERVING_MAX_HISTORY = 40, 16, 10


def _export_serving_student(root: Path, variants: tuple) -> ServingExport:
    """Train-free student (every weight moved off its init so the scores are not all ties) -> save -> export."""
    import torch

    from distill.config import StudentConfig
    from distill.student import Student
    from export.config import ExportConfig
    from export.onnx_export import export_student

    spec = ServingExport(onnx_dir=root / "onnx", item_ids=[f"m{100 + i}" for i in range(SERVING_N_ITEMS)],
                         popularity=[int(x) for x in np.random.default_rng(3).permutation(SERVING_N_ITEMS) * 7 + 1],
                         max_history=SERVING_MAX_HISTORY, text_dim=SERVING_TEXT_DIM)
    torch.manual_seed(0)
    cfg = StudentConfig(dim=32, layers=1, heads=2, max_len=12, tower_hidden=32)
    m = Student(cfg, spec.n_items, ["next_item", "rating", "like"],
                text_vectors=torch.randn(spec.n_items, spec.text_dim))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    m.eval().save(root / "student", extra=dict(item_ids=spec.item_ids, like_threshold=4.0,
                                               max_history=spec.max_history, item_popularity=spec.popularity,
                                               data_hash="abc123"))
    # a variant that misses its parity tolerance fails the export here instead of silently going missing
    # encoder variants are tested in tests/test_encoder_opt.py (static INT8 needs real calibration histories)
    export_student(root / "student", spec.onnx_dir, ExportConfig(encoder_variants=[]), variants=variants,
                   strict_variants=True)
    return spec


@pytest.fixture(scope="session")
def export_serving_student(tmp_path_factory):
    """export_serving_student(variants=()) -> ServingExport: the tiny serving model (40 items, max_history 10)
    exported with the given variants ("opt", "int8", "fp16"; none = fp32 only), built once per session."""
    built: dict = {}

    def build(variants=()) -> ServingExport:
        key = tuple(variants)
        if key not in built:
            built[key] = _export_serving_student(tmp_path_factory.mktemp("serving_export"), key)
        return built[key]
    return build


@pytest.fixture(scope="session")
def serving_export(export_serving_student) -> ServingExport:
    """The tiny serving model, fp32 only (the service and Triton tests need no other variant)."""
    return export_serving_student()
