"""LLM text vectors of items added to a served catalog after training (`distillrec add-items RUN ITEMS.csv`).

The student's item table reads `text_vectors`: the teacher's mean-pooled item-text vectors of the training
catalog, standardised per dimension over that catalog (distill/teacher.py::compute_item_vectors). A new item's
vector must come from the SAME model (the model the run read its item vectors with), the same pooling, the
text built exactly as the data stage builds item texts, and the TRAINING catalog's statistics:

  * input='item_tokens', or input='text' without a refresh: the FULL-depth base LM (before `teacher.layers`
    truncation, without LoRA), read once before training (teacher_stage._build);
  * input='text' with `refresh_item_vectors`: the truncated, LoRA-tuned LM at the refresh whose vectors the
    saved teacher holds (teacher_stage._refresh_item_vectors); that adapter snapshot is not the saved adapter
    (training went on after the refresh), so the teacher stage saves it with the statistics.

The statistics live in runs/<name>/teacher/item_text_stats.npz (STATS_FILE). `distill.cache.teacher_hash`
reads only heads / inputs / adapter safetensors, so the file does not make caches stale. Runs of older versions
and the shipped teacher have no such file: `text_vector_stats` recomputes it from the base LM, checks that it
reproduces the saved item vectors, and saves it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import pandas as pd
import torch

from .config import TeacherConfig
from .data import DataError, item_text_series, read_table
from .io import atomic_path

STATS_FILE = "item_text_stats.npz"
"""In the run's teacher folder, beside heads.safetensors (not hashed by distill.cache.teacher_hash)."""
VERIFY_ATOL = 1e-3
"""Recomputed catalog vectors must reproduce the saved ones this closely (float32 pooling over up to 30 layers,
other batch shapes or another CPU differ by ~1e-5; another text or model differs by O(1))."""
STATS_VERSION = 1
LORA_PREFIX = "lora:"
SHOW = 10
"""How many offending ids an error lists."""


class ItemFileError(ValueError):
    """A new-items file that cannot be read as items; the message names the problem and the fix."""


class ItemTextStatsError(ValueError):
    """The run's item-text statistics cannot be found or rebuilt; the message says why and what to do."""


# ----------------------------------------------------------------------------- the new-items file
def _read_table(path: Path) -> pd.DataFrame:
    """The data stage's reader (distill.data.read_table); an empty file reads as no rows (read_item_file says why)."""
    try:
        return read_table(path)
    except DataError:
        return pd.DataFrame()


def _listed(values: list, n: int = SHOW) -> str:
    """The first n values and how many more there are."""
    more = f" (+{len(values) - n} more)" if len(values) > n else ""
    return f"{values[:n]}{more}"


def _check_columns(raw: pd.DataFrame, path: Path, id_col: str, text_cols: list[str]) -> None:
    need = [id_col] + list(text_cols)
    missing = [c for c in need if c not in raw.columns]
    if missing:
        raise ItemFileError(
            f"{path}: column(s) {missing} not found; the file has {list(raw.columns)}, the run expects id column "
            f"{id_col!r} (data.item_id_col) and text column(s) {list(text_cols)} (data.item_text_cols); rename the "
            "file's columns, or pass the columns the run's config names")


def _blank(col: pd.Series) -> pd.Series:
    """True where a cell is missing (NaN/None) or only whitespace."""
    return col.isna() | col.astype(str).str.strip().eq("")


def read_item_file(path, id_col: str, text_cols: list[str], existing_ids: Iterable = ()) -> tuple[list[str], list[str]]:
    """(ids, texts) of a new-items file, one per row, in file order.

    Texts are built by `distill.data.item_text_series`, the data stage's own rule (text columns as strings
    joined by one space), so a new item reads exactly as a training item with the same cells did. Ids are
    strings: an integer id 42 is '42', as the runtime matches ids. Raises ItemFileError for a missing file,
    missing columns, no rows, blank ids, ids repeated in the file, ids already in the catalog
    (`existing_ids`), empty text cells and whitespace-only texts."""
    path = Path(path)
    text_cols = [text_cols] if isinstance(text_cols, str) else list(text_cols)
    if not path.is_file():
        raise ItemFileError(f"new-items file {path} not found ({path.resolve()}); give the path of a CSV / TSV / "
                            f"Parquet file with columns {[id_col] + text_cols}")
    raw = _read_table(path)
    if len(raw.columns) == 0:
        raise ItemFileError(f"{path} is empty (no header line); write a header {[id_col] + text_cols} and one row "
                            "per new item")
    _check_columns(raw, path, id_col, text_cols)
    if len(raw) == 0:
        raise ItemFileError(f"{path} has a header but no rows: nothing to add; write one row per new item")
    if _blank(raw[id_col]).any():
        rows = [int(i) + 2 for i in np.flatnonzero(_blank(raw[id_col]).to_numpy())]  # +2: header, 1-based
        raise ItemFileError(f"{path}: column {id_col!r} is blank on line(s) {_listed(rows)}; every item needs an id")
    ids = raw[id_col].astype(str).tolist()
    dup = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) < len(ids) else []
    if dup:
        raise ItemFileError(f"{path}: id(s) {_listed(dup)} appear more than once in column {id_col!r}; "
                            "keep one row per item")
    known = {str(i) for i in existing_ids}
    clash = [i for i in ids if i in known]
    if clash:
        raise ItemFileError(f"{path}: {len(clash)} id(s) are already in the catalog: {_listed(clash)}; new items "
                            "need new ids (drop those rows, or give them ids the catalog does not have)")
    missing = np.logical_or.reduce([raw[c].isna().to_numpy() for c in text_cols])
    if missing.any():  # the data stage's str join has no text for a missing cell ('nan' under pandas < 3)
        bad = [ids[i] for i in np.flatnonzero(missing)]
        raise ItemFileError(f"{path}: item(s) {_listed(bad)} have an empty cell in text column(s) {text_cols}; the "
                            "LLM reads an item's vector from its text: fill them in or drop those rows")
    texts = item_text_series(raw, text_cols).tolist()
    blank = [i for i, t in zip(ids, texts) if not t.strip()]
    if blank:
        raise ItemFileError(f"{path}: item(s) {_listed(blank)} have no text (column(s) {text_cols} blank); the LLM "
                            "reads an item's vector from its text: fill them in or drop those rows")
    return ids, texts


# ----------------------------------------------------------------------------- statistics records (teacher stage)
def vectors_digest(vectors) -> str:
    """sha256 (16 hex) of float32 item vectors: ties a statistics file to the saved item_vectors it produced."""
    a = vectors.detach().float().cpu().numpy() if torch.is_tensor(vectors) else np.asarray(vectors, np.float32)
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()[:16]


def stats_record(vectors, mu, sd, source: str, lora: Optional[dict] = None) -> dict:
    """What one item-vector pass of the teacher stage standardised with: mu / sd [T], which model read the texts
    ('base' = full-depth base LM, 'tuned' = the truncated LM with the LoRA weights `lora`, copied now since
    training goes on), and the digest of the standardised vectors, to match the vectors that end up saved."""
    snap = {k: v.detach().float().cpu().clone().numpy() for k, v in (lora or {}).items()}
    return dict(mu=mu.detach().float().cpu().reshape(-1).numpy().copy(),
                sd=sd.detach().float().cpu().reshape(-1).numpy().copy(),
                source=source, digest=vectors_digest(vectors), lora=snap)


def _write_stats(path: Path, rec: dict) -> None:
    """Atomic npz write (an open handle: np.savez would append '.npz' to the temp name)."""
    arrays = dict(mu=rec["mu"], sd=rec["sd"], source=np.array(rec["source"]), digest=np.array(rec["digest"]),
                  version=np.array(STATS_VERSION))
    arrays.update({LORA_PREFIX + k: v for k, v in rec["lora"].items()})
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def save_training_stats(teacher_dir: Path, records: list, item_vectors) -> Optional[Path]:
    """Save the record whose vectors the saved teacher holds (the best checkpoint may hold an earlier refresh's
    than the last). None matching (a resumed run whose pass ran in an earlier process): remove any older file,
    so `text_vector_stats` recomputes instead of trusting stale statistics."""
    path = Path(teacher_dir) / STATS_FILE
    digest = vectors_digest(item_vectors)
    match = [r for r in records if r["digest"] == digest]
    if not match:
        path.unlink(missing_ok=True)
        return None
    _write_stats(path, match[-1])
    return path


# ----------------------------------------------------------------------------- the run's teacher
@dataclass
class RunTeacher:
    """What a run's saved teacher says about how it read item texts."""
    run_dir: Path
    teacher_dir: Path
    meta: dict
    tc: TeacherConfig

    @property
    def has_ratings(self) -> bool:
        """SequenceBuilder appends ':' to item texts when the data has ratings (it is pooled too)."""
        return "rating" in self.meta["tasks"]

    @property
    def seed(self) -> int:
        return int(self.meta.get("seed", 0))

    def item_vectors(self) -> np.ndarray:
        from safetensors.numpy import load_file
        return load_file(str(self.teacher_dir / "heads.safetensors"))["item_vectors"].astype(np.float32)

    def refreshes(self) -> Optional[int]:
        """Tuned-LM refreshes of the saved item vectors (metrics.json), None when not recorded."""
        for name in ("metrics.json", "trained_metrics.json"):
            p = self.teacher_dir / name
            if p.exists():
                n = json.loads(p.read_text()).get("budget", {}).get("item_vector_refreshes")
                if n is not None:
                    return int(n)
        return None


def run_teacher(run_dir) -> RunTeacher:
    """The run's teacher folder and its config.json; a clear error when the teacher stage has not run."""
    from .teacher import saved_teacher_config
    teacher_dir = Path(run_dir) / "teacher"
    for f in ("config.json", "heads.safetensors"):
        if not (teacher_dir / f).exists():
            raise ItemTextStatsError(f"{teacher_dir / f} is missing: {run_dir} has no trained teacher; run the "
                                     f"teacher stage first (`distillrec teacher {run_dir}`)")
    meta = json.loads((teacher_dir / "config.json").read_text())
    return RunTeacher(Path(run_dir), teacher_dir, meta, saved_teacher_config(meta))


def _read_stats(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return dict(mu=z["mu"].astype(np.float32), sd=z["sd"].astype(np.float32), source=str(z["source"]),
                    digest=str(z["digest"]),
                    lora={k[len(LORA_PREFIX):]: z[k] for k in z.files if k.startswith(LORA_PREFIX)})


def _amp(tc: TeacherConfig, device: str):
    """The autocast the teacher stage read tuned vectors under: teacher_stage._amp_context's rule ('auto' = bf16
    on CUDA, none elsewhere), restated because only its drivers may import a training loop (test_layering.py)."""
    import contextlib
    device = str(device)
    mode = tc.amp if tc.amp != "auto" else ("bf16" if device.startswith("cuda") else "none")
    if mode == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def _vector_model(rt: RunTeacher, stats: dict, device):
    """(backbone, tokenizer) that read the run's item vectors: the full-depth base LM, or for 'tuned' the
    truncated LM + LoRA with the adapter snapshot of the refresh that produced the saved vectors."""
    from .teacher import add_lora, load_base, truncate_layers
    backbone, tok = load_base(rt.tc, seed=rt.seed)
    if stats["source"] == "tuned":
        with torch.random.fork_rng():  # LoRA's random init (overwritten below) leaves the caller's RNG alone
            backbone = add_lora(truncate_layers(backbone, rt.tc.layers), rt.tc)
        state = {k: torch.from_numpy(np.array(v)) for k, v in stats["lora"].items()}
        missing = set(state) - set(dict(backbone.named_parameters()))
        if missing or not state:
            raise ItemTextStatsError(f"{rt.teacher_dir / STATS_FILE}: its adapter snapshot does not fit the teacher "
                                     f"({len(missing)} unknown tensors, e.g. {sorted(missing)[:2]}); delete the file "
                                     "and retrain the teacher (`distillrec teacher`)")
        backbone.load_state_dict(state, strict=False)
    elif stats["source"] != "base":
        raise ItemTextStatsError(f"{rt.teacher_dir / STATS_FILE}: unknown source {stats['source']!r}; delete the file")
    return backbone.to(device).eval(), tok


def _raw_vectors(rt: RunTeacher, stats: dict, texts: list[str], budget: int, device, progress: bool,
                 desc: str) -> torch.Tensor:
    """Un-standardised [M, T] vectors of `texts`, read exactly as the run read its catalog's."""
    from .teacher import SequenceBuilder, raw_item_vectors
    backbone, tok = _vector_model(rt, stats, device)
    builder = SequenceBuilder(tok, texts, rt.tc.max_item_tokens, rt.has_ratings)
    with _amp(rt.tc, device) if stats["source"] == "tuned" else _nullcontext():
        return raw_item_vectors(backbone, builder, budget, device, desc=desc, progress=progress)


def _nullcontext():
    import contextlib
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- statistics of a run
def _recompute_stats(rt: RunTeacher, device, progress: bool) -> dict:
    """Base-LM statistics over the run's training catalog, verified against the saved item vectors."""
    from .config import config_from_dict, read_yaml
    from .data import load_dataset
    from .teacher import standardisation_stats
    n = rt.refreshes()
    if rt.tc.input == "text" and n:
        raise ItemTextStatsError(
            f"{rt.teacher_dir}: the saved item vectors were re-read by the LoRA-tuned teacher during training "
            f"({n} refreshes, teacher.refresh_item_vectors) and the adapter of that refresh was not saved (a run of "
            f"an older version, or a resumed one); retrain the teacher with this version (`distillrec teacher "
            f"{rt.run_dir}`), or with teacher.refresh_item_vectors=false")
    cfg_path = rt.run_dir / "config.yaml"
    if not cfg_path.exists():
        raise ItemTextStatsError(f"{cfg_path} is missing: the run's data config is needed to rebuild its item texts")
    cfg = config_from_dict(read_yaml(cfg_path))
    ds = load_dataset(cfg.data)
    if rt.meta.get("data_hash") not in (None, ds.data_hash):
        raise ItemTextStatsError(f"{rt.teacher_dir} was trained on data {rt.meta['data_hash']} but {cfg_path}'s data "
                                 f"now hashes to {ds.data_hash}: the training item texts cannot be rebuilt")
    stats = dict(source="base", lora={})
    raw = _raw_vectors(rt, stats, ds.item_text, cfg.teacher.infer_batch_tokens, device, progress,
                       desc="item vectors (statistics)")
    mu, sd = standardisation_stats(raw)
    saved = rt.item_vectors()
    got = ((raw - mu) / sd).numpy()
    diff = float(np.abs(got - saved).max()) if got.shape == saved.shape else float("inf")
    if not diff <= VERIFY_ATOL:
        raise ItemTextStatsError(
            f"{rt.teacher_dir}: the base LM's vectors of the {ds.n_items} catalog texts do not reproduce the saved "
            f"item_vectors (shape {got.shape} vs {saved.shape}, max abs diff {diff:.3g} > {VERIFY_ATOL}): the item "
            "texts (data config, item file) or the base model (teacher.model, its file) differ from the run's")
    return stats_record(torch.from_numpy(saved), mu, sd, "base")


def _valid_stats(rt: RunTeacher) -> Optional[dict]:
    """The saved statistics when they belong to the saved item vectors (same digest), else None."""
    path = rt.teacher_dir / STATS_FILE
    if not path.exists():
        return None
    stats = _read_stats(path)
    return stats if stats["digest"] == vectors_digest(rt.item_vectors()) else None


def _run_stats(run_dir, device="cpu", progress: bool = True) -> tuple[RunTeacher, dict]:
    rt = run_teacher(run_dir)
    stats = _valid_stats(rt)
    if stats is None:
        rec = _recompute_stats(rt, device, progress)
        _write_stats(rt.teacher_dir / STATS_FILE, rec)
        stats = _read_stats(rt.teacher_dir / STATS_FILE)
    return rt, stats


def text_vector_stats(run_dir, device="cpu", progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(mu [T], sd [T]) float32: the per-dimension statistics the run standardised its catalog's item-text vectors
    with. Read from teacher/item_text_stats.npz (written by the teacher stage); when absent or stale (a run of an
    older version, the shipped teacher) recomputed from the base LM over the training catalog, verified to
    reproduce the saved item_vectors within VERIFY_ATOL, and saved so the next call is instant."""
    _, stats = _run_stats(run_dir, device, progress)
    return stats["mu"], stats["sd"]


def encode_item_texts(run_dir, texts: list[str], device="cpu", progress: bool = True) -> np.ndarray:
    """[M, T] float32 text vectors of new item texts, read like the run's training items (same model, depth,
    adapter or not, pooling) and standardised with the TRAINING catalog's statistics (not the batch's)."""
    rt, stats = _run_stats(run_dir, device, progress)
    texts = list(texts)
    if not texts:
        return np.zeros((0, stats["mu"].shape[0]), np.float32)
    raw = _raw_vectors(rt, stats, texts, rt.tc.infer_batch_tokens, device, progress, desc="new item vectors")
    mu, sd = torch.from_numpy(stats["mu"])[None], torch.from_numpy(stats["sd"])[None]
    return ((raw - mu) / sd).numpy().astype(np.float32)
