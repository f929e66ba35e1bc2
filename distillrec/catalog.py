"""Live catalog updates of an exported run: `distillrec add-items` / `remove-items` (no retraining, no re-export).

    distillrec add-items runs/cpu-default new_items.csv        # item_id,title  (the run's data columns)
    distillrec remove-items runs/cpu-default 1681 1682         # or --file ids.txt; --reactivate brings back

add-items, step by step:
  1. read   the file's `data.item_id_col` and `data.item_text_cols` columns (the run's config; by default
            item_id and title); duplicate ids, ids already in the table, empty text, missing columns are
            errors that name them (distill/item_text.py);
  2. text   each new item's LLM text vector with the run's teacher, its text built exactly as the run built
            its item texts and standardised with the statistics of the training catalog;
  3. rows   the student's cold-start path: zero ID embedding and bias, the text projection, the rating / like
            towers' item features (export/two_part.py cold_item_arrays);
  4. publish a new item table version (export/item_table.py): written whole, then CURRENT is replaced; a
            failure at any step leaves the served version as it was. Running servers pick it up
            (Recommender.reload(); the HTTP service polls the version).
The encoder is not re-exported: the old items' rows are copied unchanged, so their scores do not move.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

from export import contract as C
from export.item_table import ItemTableError, append_items, load_table, set_active


class CatalogError(ValueError):
    """The run cannot take catalog updates (not exported, trained without text vectors, mismatched student)."""


def _served_table(run_dir: Path):
    """(items folder, the version served now) of a run; CatalogError when the run has no usable item table."""
    items = C.item_table_dir(C.serving_dir(run_dir))
    try:
        return items, load_table(items, mmap=True)
    except ItemTableError as e:
        raise CatalogError(f"{run_dir} has no usable item table ({e}); run `distillrec export {run_dir}` first") from None


def _check_student(student, table, run_dir: Path) -> None:
    from export.two_part import student_model_id
    want = table.meta.get("model_id")
    have = student_model_id(run_dir / "student") if want else None
    if want and have != want:
        raise CatalogError(f"{run_dir / 'student'} changed since the item table was exported (model "
                           f"{have}, the table was built for {want}): new rows must "
                           f"come from the served student; run `distillrec export {run_dir}` first")
    trained = int(table.meta.get("trained_items", table.n_items))
    if student.n_items != trained or int(student.cfg.dim) != table.dim:
        raise CatalogError(f"{run_dir / 'student'} ({student.n_items} items, dim {student.cfg.dim}) is not the student "
                           f"the item table was exported from ({trained} trained items, dim {table.dim}); re-run "
                           f"`distillrec export {run_dir}`")
    if student.text_proj is None:
        raise CatalogError(f"{run_dir / 'student'} was trained without text vectors (student.use_text_vectors=false): "
                           "new items have nothing to be scored from; retrain with use_text_vectors=true")


def run_data_config(run_dir: Path):
    """The run's data section (its config.yaml), validated: which columns and text rule its items came from."""
    import yaml

    from distill.config import ConfigError, DataConfig, build_config
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CatalogError(f"{path} not found: {run_dir} is not a run folder (start one with `distillrec run`)")
    try:
        return build_config(DataConfig, (yaml.safe_load(path.read_text()) or {}).get("data") or {}, "data")
    except ConfigError as e:
        raise CatalogError(f"{path}: {e}") from None


def add_items(run_dir, items_file, device: str = "cpu", progress: bool = True) -> dict:
    """Append the items of `items_file` to the run's served item table; returns a summary with step timings."""
    from distill.item_text import encode_item_texts
    from distill.student import Student
    from export.two_part import cold_item_arrays

    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    data_cfg = run_data_config(run_dir)
    items, table = _served_table(run_dir)
    student = Student.load(run_dir / "student")
    _check_student(student, table, run_dir)
    ids, texts = read_new_items(data_cfg, items_file, existing_ids=table.ids)
    t_read = time.perf_counter()
    text = encode_item_texts(run_dir, texts, device=device, progress=progress)
    t_text = time.perf_counter()
    arrays = cold_item_arrays(student, text, with_text="text" in table.arrays)
    version, change = append_items(items, ids, arrays)
    t_end = time.perf_counter()
    return {"added": len(ids), "version": version, "previous_version": table.version,
            "n_items": table.n_items + len(ids), "first_row": change["first_row"],
            "seconds": {"read": round(t_read - t0, 2), "text_vectors": round(t_text - t_read, 2),
                        "rows_and_publish": round(t_end - t_text, 2), "total": round(t_end - t0, 2)}}


ML100K_YEAR_COL = "release_year"
"""ML-100K runs build an item's text as "<title> (<release_year>)" (distill/data.py, recbole's item file)."""


def read_new_items(data_cfg, path, existing_ids=()) -> tuple[list[str], list[str]]:
    """(ids, texts) of a new-items file, the texts built as the run built its item texts: the run's
    data.item_text_cols joined by a space (distill/item_text.py), and for an ML-100K run, whose training texts
    were "<title> (<year>)", the year appended the same way when the file has a `release_year` column."""
    from distill.data import ml100k_item_text, read_table
    from distill.item_text import read_item_file
    ids, texts = read_item_file(path, data_cfg.item_id_col, list(data_cfg.item_text_cols), existing_ids)
    if data_cfg.source != "ml-100k":
        return ids, texts
    raw = read_table(Path(path))
    if ML100K_YEAR_COL not in raw.columns:
        return ids, texts
    years = raw[ML100K_YEAR_COL]
    full = ml100k_item_text(texts, years).tolist()
    blank = years.isna().to_numpy() | years.astype(str).str.strip().eq("").to_numpy()
    return ids, [t if b else f for t, f, b in zip(texts, full, blank)]


def read_id_file(path) -> list[str]:
    """One id per line (blank lines and # comments skipped), or the first column of a CSV with a header."""
    p = Path(path)
    if not p.is_file():
        raise CatalogError(f"{p} not found")
    lines = [ln.strip() for ln in p.read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if lines and "," in lines[0]:
        lines = [ln.split(",")[0].strip() for ln in lines[1:]]
    return lines


def remove_items(run_dir, ids: Sequence[str] = (), id_file: Optional[str] = None, reactivate: bool = False) -> dict:
    """Take items out of serving (or back in with reactivate=True) as a new table version. Rows stay: a
    history holding a removed item still encodes it; it is only never recommended."""
    run_dir = Path(run_dir)
    wanted = [str(x) for x in ids] + (read_id_file(id_file) if id_file else [])
    if not wanted:
        raise CatalogError("no item ids given: pass ids or --file")
    items, before = _served_table(run_dir)
    version, change = set_active(items, wanted, active=reactivate)
    table = load_table(items, version)
    return {"version": version, "previous_version": before.version, "changed": change["count"],
            "unchanged": change["unchanged"], "n_active": table.n_active, "n_items": table.n_items}
