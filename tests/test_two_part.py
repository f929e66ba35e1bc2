"""Two-part serving: user encoder + item table, against the single graph; live item table updates."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from export import contract as C
from export.item_table import (ItemTableError, ItemUpdateError, append_items, current_version, load_table,
                               set_active, versions_on_disk, write_table)
from export.runtime import Recommender, RequestError, RuntimeArtifactError


@pytest.fixture()
def onnx_copy(serving_export, tmp_path):
    """A private copy of the tiny exported folder (these tests change its item table)."""
    dst = tmp_path / "onnx"
    shutil.copytree(serving_export.onnx_dir, dst)
    return dst


def _histories(ids, n, rng, max_len=14):
    return [[ids[i] for i in rng.choice(len(ids), size=rng.integers(1, max_len), replace=False)] for _ in range(n)]


# ---------------------------------------------------------------------------------------------- the model side
def test_last_only_encoder_equals_the_full_encoder():
    from distill.config import StudentConfig
    from distill.student import Student
    torch.manual_seed(0)
    m = Student(StudentConfig(dim=32, layers=3, heads=4, max_len=12), 30, ["next_item", "rating", "like"],
                text_vectors=torch.randn(30, 8)).eval()
    m.freeze_item_table()
    table = m.item_table()
    items = torch.randint(0, 30, (5, 9))
    rates = torch.randint(0, 6, (5, 9)).float()
    length = torch.tensor([0, 1, 4, 8, 9])
    with torch.no_grad():
        full = m.encode(items, rates, length, table)[:, -1]
        last = m.encode_vectors(table[items], rates, length, last_only=True)
    assert last.shape == (5, 32)
    assert torch.allclose(full, last, atol=1e-5)


def test_export_writes_the_two_part_model(serving_export):
    d = serving_export.onnx_dir
    meta = json.loads((d / C.RUNTIME_META_FILE).read_text())
    tp = meta["two_part"]
    assert meta["schema_version"] == C.SCHEMA_VERSION == 2
    assert tp["encoder_outputs"] == ["user_vector", "rating_user", "like_user"]
    assert tp["scorer_outputs"] == ["rating", "like_logit"]
    assert (d / C.ENCODER_FILE).is_file() and (d / C.SCORER_FILE).is_file()
    table = load_table(d / C.ITEM_TABLE_DIR)
    assert table.ids == serving_export.item_ids
    assert table.n_active == serving_export.n_items and table.meta["trained_items"] == serving_export.n_items
    assert table.popularity.tolist() == serving_export.popularity
    assert table.vectors.shape == (serving_export.n_items, 32) and table.features("rating").shape == (40, 32)
    assert table.arrays["text"].shape == (40, serving_export.text_dim)
    parity = json.loads((d / C.PARITY_FILE).read_text())["two_part"]
    assert parity["passed"] and parity["points"] >= 10
    assert set(parity["max_abs_diff"]) == {"next_item_scores", "rating", "like_logit"}
    assert max(parity["max_abs_diff"].values()) <= 1e-4
    assert max(parity["max_abs_diff_vs_single_onnx"].values()) <= 1e-4


def test_two_part_answers_equal_the_single_graph(serving_export):
    two = Recommender(serving_export.onnx_dir)
    one = Recommender(serving_export.onnx_dir, mode="single")
    assert two.mode == "two_part" and one.mode == "single"
    assert two.model_path.name == C.ENCODER_FILE and one.model_path.name == C.STUDENT_FILE
    rng = np.random.default_rng(0)
    ids = serving_export.item_ids
    hist = _histories(ids, 12, rng)
    excl = [list(rng.choice(ids, 3)) for _ in hist]
    allow = [None if i % 3 else list(rng.choice(ids, 8, replace=False)) for i in range(len(hist))]
    for kw in ({}, {"exclude": excl}, {"allow": allow}, {"exclude_seen": False, "exclude": excl, "allow": allow}):
        a = two.recommend_batch(hist, k=7, **kw)
        b = one.recommend_batch(hist, k=7, **kw)
        for ra, rb in zip(a, b):
            assert [i for i, _ in ra] == [i for i, _ in rb]
            assert np.allclose([s for _, s in ra], [s for _, s in rb], atol=1e-4)
    cands = [list(rng.choice(ids, 5)) for _ in hist]
    for sa, sb in zip(two.score_batch(hist, cands), one.score_batch(hist, cands)):
        for key in ("rating", "like", "like_logit"):
            assert np.allclose(sa[key], sb[key], atol=1e-5)


def test_allow_and_deny_lists_apply_before_top_k(serving_export):
    rec = Recommender(serving_export.onnx_dir)
    hist = serving_export.item_ids[:3]
    full = [i for i, _ in rec.recommend(hist, k=40)]
    low = full[-5:]  # the five lowest-scored unseen items
    got = [i for i, _ in rec.recommend(hist, k=3, allow=low + hist)]
    assert got == low[:3]  # ranked among the allowed, seen items still excluded
    deny = full[:4]
    assert [i for i, _ in rec.recommend(hist, k=5, exclude=deny)] == full[4:9]
    assert rec.recommend(hist, k=5, allow=hist) == []  # only seen items allowed: nothing eligible
    assert rec.recommend(hist, k=5, allow=["not-an-item"]) == []


# ---------------------------------------------------------------------------------------------- the item table
def _row_arrays(table, rows):
    return {k: np.asarray(a[rows]) for k, a in table.arrays.items() if k not in ("active", "popularity")}


def test_append_items_keeps_old_scores_and_serves_the_new_ones(onnx_copy):
    items = onnx_copy / C.ITEM_TABLE_DIR
    rec = Recommender(onnx_copy)
    hist = ["m101", "m105", "m120"]
    before = rec.predict_arrays(*rec.encode_histories([hist]))[C.SCORES_OUTPUT][0]
    table = load_table(items)
    new = _row_arrays(table, [3, 7])
    top = int(np.argmax(before))
    new["vectors"][0] = table.vectors[top] * 3.0  # an item that must now rank first for this user
    new["bias"][0] = table.bias[top] + 10.0
    version, change = append_items(items, ["new1", "new2"], new)
    assert version == table.version + 1 and change["first_row"] == 40
    assert rec.table_version == table.version and rec.disk_table_version() == version
    assert "new1" not in rec.index  # not served until reload
    assert rec.reload() is True and rec.reload() is False
    assert rec.table_version == version and rec.n_items == 42
    after = rec.predict_arrays(*rec.encode_histories([hist]))[C.SCORES_OUTPUT][0]
    assert np.max(np.abs(after[:40] - before)) <= 1e-6  # old items unchanged
    assert rec.recommend(hist, k=1)[0][0] == "new1"
    # a new item in a history is encoded from its row: the same answer as m107, whose row new2 copies
    a = rec.predict_arrays(*rec.encode_histories([["new2"]]))[C.SCORES_OUTPUT][0]
    b = rec.predict_arrays(*rec.encode_histories([["m107"]]))[C.SCORES_OUTPUT][0]
    assert np.allclose(a, b, atol=1e-5)


def test_bad_updates_are_refused_and_leave_the_table_intact(onnx_copy, monkeypatch):
    items = onnx_copy / C.ITEM_TABLE_DIR
    table = load_table(items)
    v0 = table.version
    rows = _row_arrays(table, [1])
    with pytest.raises(ItemUpdateError, match="already in the catalog"):
        append_items(items, ["m101"], rows)
    with pytest.raises(ItemUpdateError, match="more than once"):
        append_items(items, ["x", "x"], _row_arrays(table, [1, 2]))
    bad = {**rows, "vectors": np.full_like(rows["vectors"], np.nan)}
    with pytest.raises(ItemUpdateError, match="NaN"):
        append_items(items, ["x"], bad)
    with pytest.raises(ItemUpdateError, match="shape"):
        append_items(items, ["x"], {**rows, "vectors": rows["vectors"][:, :5]})
    with pytest.raises(ItemUpdateError, match="carry arrays"):
        append_items(items, ["x"], {k: v for k, v in rows.items() if k != "text"})
    with pytest.raises(ItemUpdateError, match="unknown item id"):
        set_active(items, ["nope"], active=False)
    # a crash half way through writing the new version: CURRENT still names the old one, no partial folder
    real_save = np.save
    calls = {"n": 0}

    def flaky_save(f, a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real_save(f, a, **kw)
    monkeypatch.setattr(np, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        append_items(items, ["x"], rows)
    monkeypatch.setattr(np, "save", real_save)
    assert current_version(items) == v0 and versions_on_disk(items) == [v0]
    assert not [p for p in items.iterdir() if p.name.startswith(".tmp")]
    assert load_table(items).ids == table.ids


def test_remove_items_stops_recommending_but_still_encodes(onnx_copy, serving_export):
    items = onnx_copy / C.ITEM_TABLE_DIR
    rec = Recommender(onnx_copy, empty_history="popularity")
    hist = ["m101", "m105"]
    top = [i for i, _ in rec.recommend(hist, k=3)]
    version, change = set_active(items, top[:2], active=False)
    assert change["count"] == 2 and rec.reload()
    got = [i for i, _ in rec.recommend(hist, k=40)]
    assert not set(top[:2]) & set(got) and len(got) == 40 - 2 - 2
    rec.recommend([top[0]], k=3)  # a removed item in a history still encodes
    pop_top = serving_export.item_ids[int(np.argmax(serving_export.popularity))]
    set_active(items, [pop_top], active=False)
    rec.reload()
    assert pop_top not in [i for i, _ in rec.recommend([], k=5)]  # popularity answers skip removed items
    _, change = set_active(items, top[:2] + [pop_top], active=True)
    assert change["count"] == 3
    rec.reload()
    assert [i for i, _ in rec.recommend(hist, k=3)] == top


def test_versions_are_pruned_and_a_reexport_starts_a_newer_version(onnx_copy):
    items = onnx_copy / C.ITEM_TABLE_DIR
    table = load_table(items)
    for i in range(4):
        set_active(items, [table.ids[i]], active=False)
    vs = versions_on_disk(items)
    assert len(vs) == 3 and vs[-1] == current_version(items) == table.version + 4
    v = write_table(items, table.ids, {k: np.asarray(a) for k, a in table.arrays.items()})
    assert v == table.version + 5 and load_table(items).n_active == 40


def test_broken_tables_are_clear_errors(onnx_copy):
    items = onnx_copy / C.ITEM_TABLE_DIR
    (items / "CURRENT").write_text("garbage")
    with pytest.raises(RuntimeArtifactError, match="CURRENT is corrupt"):
        Recommender(onnx_copy)
    (items / "CURRENT").write_text("v000001\n")
    np.save(items / "v000001" / "bias.npy", np.zeros(3, dtype=np.float32))
    with pytest.raises(RuntimeArtifactError, match="bias has 3 rows for 40 ids"):
        Recommender(onnx_copy)
    with pytest.raises(ItemTableError, match="missing"):
        load_table(onnx_copy / "nowhere")


def test_single_graph_folders_of_schema_1_still_serve(onnx_copy):
    meta = json.loads((onnx_copy / C.RUNTIME_META_FILE).read_text())
    meta.pop("two_part")
    meta["schema_version"] = 1
    (onnx_copy / C.RUNTIME_META_FILE).write_text(json.dumps(meta))
    rec = Recommender(onnx_copy)
    assert rec.mode == "single" and rec.table_version == 0 and rec.reload() is False
    assert len(rec.recommend(["m101"], k=4)) == 4
    with pytest.raises(RuntimeArtifactError, match="no two-part model"):
        Recommender(onnx_copy, mode="two_part")


def test_requests_with_bad_lists_are_request_errors(serving_export):
    rec = Recommender(serving_export.onnx_dir)
    with pytest.raises(RequestError, match="allow must be a list"):
        rec.recommend_batch([["m101"]], allow="m102")
    with pytest.raises(RequestError, match="exclude must be a list"):
        rec.recommend_batch([["m101"]], exclude=[["m1"], ["m2"]])


def test_ann_index_is_saved_per_version_and_reused(onnx_copy, caplog):
    pytest.importorskip("faiss")
    from export.retrieval import INDEX_FILE
    rec = Recommender(onnx_copy, retrieval="ann", ann_params={"nprobe": 2})
    vdir = onnx_copy / C.ITEM_TABLE_DIR / f"v{rec.table_version:06d}"
    assert rec.catalog.retriever.kind == "ann" and (vdir / "ann" / INDEX_FILE).is_file()
    assert not [p for p in vdir.iterdir() if p.name.endswith(".tmp")]  # written under a temporary name
    hist = ["m101", "m105", "m120"]
    want = rec.recommend(hist, k=5)
    mtime = (vdir / "ann" / INDEX_FILE).stat().st_mtime_ns
    again = Recommender(onnx_copy, retrieval="ann", ann_params={"nprobe": 2})  # search parameters only: reused
    assert again.recommend(hist, k=5) == want and (vdir / "ann" / INDEX_FILE).stat().st_mtime_ns == mtime
    other = Recommender(onnx_copy, retrieval="ann", ann_params={"nprobe": 2, "nlist": 3})  # a build parameter:
    assert other.recommend(hist, k=5) == want and (vdir / "ann" / INDEX_FILE).stat().st_mtime_ns == mtime  # not saved
    # a corrupt saved index is rebuilt (and replaced), with a warning, never served
    (vdir / "ann" / INDEX_FILE).write_bytes(b"garbage")
    with caplog.at_level("WARNING", logger="distillrec.runtime"):
        third = Recommender(onnx_copy, retrieval="ann", ann_params={"nprobe": 2})
    assert any("not reused" in r.getMessage() for r in caplog.records)
    assert third.recommend(hist, k=5) == want and (vdir / "ann" / INDEX_FILE).stat().st_size > 100


def test_a_table_of_another_export_is_refused(onnx_copy):
    rec = Recommender(onnx_copy)
    meta = json.loads((onnx_copy / C.RUNTIME_META_FILE).read_text())
    assert rec.two_part["model_id"] and load_table(onnx_copy / C.ITEM_TABLE_DIR).meta["model_id"] == meta["two_part"]["model_id"]
    table = load_table(onnx_copy / C.ITEM_TABLE_DIR)
    write_table(onnx_copy / C.ITEM_TABLE_DIR, table.ids, {k: np.asarray(a) for k, a in table.arrays.items()},
                model_id="another-export")  # what a re-export of a retrained student publishes
    with pytest.raises(RuntimeArtifactError, match="belongs to another export"):
        rec.reload()
    assert rec.table_version == table.version  # still serving the old one
    # updates keep their parent's model id
    set_active(onnx_copy / C.ITEM_TABLE_DIR, ["m101"], active=False)
    assert load_table(onnx_copy / C.ITEM_TABLE_DIR).meta["model_id"] == "another-export"
