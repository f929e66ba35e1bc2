"""Text vectors of items added after training (distill/item_text.py): read with the run's own model and pooling,
standardised with the TRAINING catalog's statistics, and the new-items file's checks.

Two tiny random teachers (configs/tiny.yaml, ~15 s each) are trained once per module: input='item_tokens'
(vectors from the full-depth base LM) and input='text' with refreshes (vectors from the LoRA-tuned LM at an
epoch boundary, whose adapter is not the saved one)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from distill import item_text as it
from distill.item_text import (STATS_FILE, ItemFileError, ItemTextStatsError, encode_item_texts, read_item_file,
                               text_vector_stats)

N_ITEMS, HIDDEN = 1682, 64  # ML-100K catalog, tiny.yaml hidden size


def _train(root: Path, name: str, *overrides: str) -> Path:
    """A tiny trained teacher in root/name, with the run's config.yaml (as `distillrec run` writes it)."""
    from distill.config import config_to_dict, load_config
    from distill.teacher_stage import train_teacher
    cfg = load_config("configs/tiny.yaml", [f"out_dir={root}", f"name={name}", "teacher.train_users=1",
                                            "teacher.max_steps=3", "teacher.eval_users=4",
                                            "teacher.lr=0.01", *overrides])
    train_teacher(cfg)
    (root / name / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    # 1 user = 4 windows = one step per epoch (batch 4): 3 steps cross 2 epoch boundaries -> 2 refreshes
    return dict(tokens=_train(root, "tokens", "teacher.input=item_tokens", "teacher.layers=1"),
                text=_train(root, "text", "teacher.input=text", "teacher.refresh_item_vectors=true"))


@pytest.fixture(scope="module")
def catalog():
    from distill.config import DataConfig
    from distill.data import load_dataset
    return load_dataset(DataConfig())


def _saved(run: Path) -> np.ndarray:
    from safetensors.numpy import load_file
    return load_file(str(run / "teacher" / "heads.safetensors"))["item_vectors"]


def _copy(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / run.name
    shutil.copytree(run, dest)
    return dest


# ----------------------------------------------------------------------------- the model that read the vectors
def test_item_tokens_run_saves_base_stats_and_reencodes_its_catalog(runs, catalog):
    run = runs["tokens"]
    with np.load(run / "teacher" / STATS_FILE) as z:
        assert str(z["source"]) == "base" and z["mu"].shape == z["sd"].shape == (HIDDEN,)
        assert not [k for k in z.files if k.startswith(it.LORA_PREFIX)]
    saved = _saved(run)
    assert saved.shape == (N_ITEMS, HIDDEN)
    got = encode_item_texts(run, catalog.item_text, progress=False)
    assert got.shape == saved.shape and got.dtype == np.float32
    assert np.abs(got - saved).max() < 1e-4
    # a handful of items is standardised with the CATALOG's statistics, not the batch's
    pick = [0, 7, 500, 1681]
    few = encode_item_texts(run, [catalog.item_text[i] for i in pick], progress=False)
    assert np.abs(few - saved[pick]).max() < 1e-4
    assert np.abs(few.mean(0)).max() > 0.1  # a batch-standardised result would have mean 0 per dimension
    # the full-depth base LM (before teacher.layers=1 truncation) read them: the 1-layer trunk does not
    from distill.teacher import SequenceBuilder, compute_item_vectors, load_base, truncate_layers
    from distill.teacher import item_vectors_with_stats, saved_teacher_config
    tc = saved_teacher_config(json.loads((run / "teacher" / "config.json").read_text()))
    backbone, tok = load_base(tc, seed=0)
    builder = SequenceBuilder(tok, catalog.item_text, tc.max_item_tokens, True)
    full = compute_item_vectors(backbone, builder, tc.infer_batch_tokens, "cpu")
    assert torch.equal(full, torch.from_numpy(saved))  # the saved vectors are exactly compute_item_vectors'
    vecs, mu, sd = item_vectors_with_stats(backbone, builder, tc.infer_batch_tokens, "cpu")
    assert torch.equal(vecs, full)
    np.testing.assert_array_equal(text_vector_stats(run)[0], mu[0].numpy())
    np.testing.assert_array_equal(text_vector_stats(run)[1], sd[0].numpy())
    cut = compute_item_vectors(truncate_layers(backbone, 1), builder, tc.infer_batch_tokens, "cpu")
    assert (cut - full).abs().max() > 1e-2


def test_text_run_with_refreshes_saves_the_refresh_adapter_and_reencodes_its_catalog(runs, catalog):
    run = runs["text"]
    metrics = json.loads((run / "teacher" / "metrics.json").read_text())
    assert metrics["budget"]["item_vector_refreshes"] == 2
    with np.load(run / "teacher" / STATS_FILE) as z:
        assert str(z["source"]) == "tuned"
        lora = [k for k in z.files if k.startswith(it.LORA_PREFIX)]
        assert lora and all("lora_" in k for k in lora)  # the adapter snapshot of that refresh
    saved = _saved(run)
    got = encode_item_texts(run, catalog.item_text, progress=False)
    assert got.shape == (N_ITEMS, HIDDEN)
    assert np.abs(got - saved).max() < 1e-4
    # neither the base LM nor the final saved adapter read them
    base = dict(source="base", lora={})
    rt = it.run_teacher(run)
    raw = it._raw_vectors(rt, base, catalog.item_text, 8192, "cpu", False, "test")
    assert np.abs(((raw - raw.mean(0)) / raw.std(0)).numpy() - saved).max() > 1e-3


def test_text_run_without_its_stats_file_says_to_retrain(runs, tmp_path):
    run = _copy(runs["text"], tmp_path)
    (run / "teacher" / STATS_FILE).unlink()
    with pytest.raises(ItemTextStatsError, match=r"re-read by the LoRA-tuned teacher.*2 refreshes.*retrain"):
        text_vector_stats(run)
    assert not (run / "teacher" / STATS_FILE).exists()


# ----------------------------------------------------------------------------- recomputing the statistics
def test_stats_recompute_matches_saved_and_is_saved(runs, catalog, tmp_path, monkeypatch):
    run = _copy(runs["tokens"], tmp_path)
    mu0, sd0 = text_vector_stats(run)
    (run / "teacher" / STATS_FILE).unlink()
    mu, sd = text_vector_stats(run, progress=False)
    assert mu.shape == sd.shape == (HIDDEN,) and mu.dtype == sd.dtype == np.float32
    np.testing.assert_allclose(mu, mu0, atol=1e-6)
    np.testing.assert_allclose(sd, sd0, rtol=1e-6)
    assert (run / "teacher" / STATS_FILE).exists()
    monkeypatch.setattr(it, "_recompute_stats", lambda *a, **k: pytest.fail("recomputed although saved"))
    got = encode_item_texts(run, catalog.item_text[:50], progress=False)
    assert np.abs(got - _saved(run)[:50]).max() < 1e-4


def test_stale_stats_file_is_recomputed(runs, tmp_path):
    run = _copy(runs["tokens"], tmp_path)
    mu0, _ = text_vector_stats(run)
    rec = dict(mu=np.zeros(HIDDEN, np.float32), sd=np.ones(HIDDEN, np.float32), source="base",
               digest="0" * 16, lora={})  # written for other item vectors (e.g. an older teacher)
    it._write_stats(run / "teacher" / STATS_FILE, rec)
    np.testing.assert_allclose(text_vector_stats(run, progress=False)[0], mu0, atol=1e-6)


def test_recompute_refuses_vectors_it_cannot_reproduce(runs, tmp_path):
    from safetensors.numpy import load_file, save_file
    run = _copy(runs["tokens"], tmp_path)
    (run / "teacher" / STATS_FILE).unlink()
    heads = load_file(str(run / "teacher" / "heads.safetensors"))
    heads["item_vectors"] = heads["item_vectors"][::-1].copy()  # as if the item texts were in another order
    save_file(heads, str(run / "teacher" / "heads.safetensors"))
    with pytest.raises(ItemTextStatsError, match=r"do not reproduce the saved item_vectors.*item texts"):
        text_vector_stats(run, progress=False)
    assert not (run / "teacher" / STATS_FILE).exists()


def test_missing_teacher_is_a_clear_error(tmp_path):
    with pytest.raises(ItemTextStatsError, match=r"no trained teacher.*distillrec teacher"):
        text_vector_stats(tmp_path)


def test_no_texts_gives_an_empty_table(runs):
    assert encode_item_texts(runs["tokens"], [], progress=False).shape == (0, HIDDEN)


# ----------------------------------------------------------------------------- the new-items file
def _write(path: Path, frame: pd.DataFrame) -> Path:
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, sep="\t" if path.suffix == ".tsv" else ",", index=False)
    return path


def test_item_text_is_the_data_stage_text(tmp_path):
    from distill.config import DataConfig
    from distill.data import load_dataset
    items = pd.DataFrame({"id": [1, 2, 3], "name": ["Alpha", "Beta", "Gamma"], "year": [1999, 2001, 1987]})
    _write(tmp_path / "items.csv", items)
    pd.DataFrame({"uid": ["x", "x", "y"], "iid": [1, 2, 3], "stars": [5.0, 4.0, 2.0], "ts": [1, 2, 1]}).to_csv(
        tmp_path / "log.csv", index=False)
    ds = load_dataset(DataConfig(source="csv", path=str(tmp_path / "log.csv"), items_path=str(tmp_path / "items.csv"),
                                 item_id_col="id", item_text_cols=["name", "year"], user_col="uid", item_col="iid",
                                 rating_col="stars", time_col="ts"))
    ids, texts = read_item_file(tmp_path / "items.csv", "id", ["name", "year"])
    assert ids == ["1", "2", "3"]  # int ids as strings, as the runtime matches them
    assert texts == ["Alpha 1999", "Beta 2001", "Gamma 1987"]
    assert dict(zip(ids, texts)) == dict(zip([str(i) for i in ds.item_ids], ds.item_text))


@pytest.mark.parametrize("suffix", [".tsv", ".parquet"])
def test_tsv_and_parquet(tmp_path, suffix):
    path = _write(tmp_path / f"items{suffix}", pd.DataFrame({"item_id": ["a", "b"], "title": ["X (1990)", "Y"]}))
    assert read_item_file(path, "item_id", ["title"]) == (["a", "b"], ["X (1990)", "Y"])


def _frame(**cols):
    return pd.DataFrame({"item_id": [10, 11, 12], "title": ["A", "B", "C"], **cols})


@pytest.mark.parametrize("frame, kw, pattern", [
    (_frame(), dict(text_cols=["name"]),
     r"\['name'\] not found; the file has \['item_id', 'title'\].*'item_id' \(data.item_id_col\).*\['name'\] "
     r"\(data.item_text_cols\)"),
    (_frame().rename(columns={"item_id": "sku"}), {}, r"\['item_id'\] not found.*\['sku', 'title'\]"),
    (pd.DataFrame({"item_id": [10, 11, 10, 12, 11], "title": list("ABCDE")}), {},
     r"id\(s\) \['10', '11'\] appear more than once"),
    (_frame(), dict(existing_ids=["12", "1", "10"]), r"2 id\(s\) are already in the catalog: \['10', '12'\]"),
    (_frame(), dict(existing_ids=[11]), r"already in the catalog: \['11'\]"),
    (pd.DataFrame({"item_id": [10, 11, 12], "title": ["A", "  ", None]}), {},
     r"item\(s\) \['12'\] have an empty cell"),
    (pd.DataFrame({"item_id": [10, 11, 12], "title": ["A", "  ", "C"]}), {}, r"item\(s\) \['11'\] have no text"),
    (pd.DataFrame({"item_id": [10, None], "title": ["A", "B"]}), {}, r"blank on line\(s\) \[3\]"),
    (pd.DataFrame({"item_id": [], "title": []}), {}, r"header but no rows"),
])
def test_item_file_errors(tmp_path, frame, kw, pattern):
    path = _write(tmp_path / "items.csv", frame)
    kw = dict(dict(id_col="item_id", text_cols=["title"]), **kw)
    with pytest.raises(ItemFileError, match=pattern):
        read_item_file(path, **kw)


def test_item_file_missing_or_empty(tmp_path):
    with pytest.raises(ItemFileError, match=r"nope.csv not found.*columns \['item_id', 'title'\]"):
        read_item_file(tmp_path / "nope.csv", "item_id", ["title"])
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ItemFileError, match=r"empty \(no header line\)"):
        read_item_file(tmp_path / "empty.csv", "item_id", ["title"])
    assert issubclass(ItemFileError, ValueError)


def test_an_empty_cell_in_any_text_column_is_an_error(tmp_path):
    path = _write(tmp_path / "items.csv", pd.DataFrame({"item_id": ["a", "b"], "title": ["Up", "Cars"],
                                                        "genre": ["Drama", None]}))
    with pytest.raises(ItemFileError, match=r"item\(s\) \['b'\] have an empty cell in text column\(s\) \['title', 'genre'\]"):
        read_item_file(path, "item_id", ["title", "genre"])
    assert read_item_file(path, "item_id", ["title"]) == (["a", "b"], ["Up", "Cars"])
