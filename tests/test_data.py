"""distill.data: sources, the leave-last-out split of docs/protocol.md, and the DataError messages."""
import numpy as np
import pandas as pd
import pytest

from distill.config import DataConfig
from distill.data import DataError, Split, load_dataset


def write_csv(path, text):
    path.write_text(text.strip() + "\n")
    return path


def csv_cfg(path, **kw):
    return DataConfig(source="csv", path=str(path), **kw)


def raw_items(ds, u):
    return [ds.item_ids[i] for i in ds.items[u]]


# ----------------------------------------------------------------------------- ML-100K (conftest's `ml100k`)
def test_ml100k_stats(ml100k):
    stats = ml100k.stats()
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100000)
    assert ml100k.tasks == ["next_item", "rating", "like"]
    assert (stats["item_text"]["with_text"], stats["item_text"]["coverage"]) == (1682, 1.0)  # every title found
    assert len(Split.leave_last_out(ml100k).eval_users) == 943  # every ML-100K user has >= 20 ratings


def test_ml100k_sequences_are_chronological(ml100k):
    raw = pd.read_csv(ml100k.source_file, sep="\t")
    raw.columns = [c.split(":")[0] for c in raw.columns]
    u = 0
    mine = raw[raw["user_id"].astype(str) == ml100k.user_ids[u]]
    expected = mine.sort_values("timestamp", kind="stable")["item_id"].astype(str).tolist()
    assert raw_items(ml100k, u) == expected


# ----------------------------------------------------------------------------- the split
TIES = """
user_id,item_id,rating,timestamp
1,10,5,100
1,11,4,200
1,12,3,200
2,20,4,10
1,13,2,200
2,21,1,20
1,14,1,50
"""


def test_leave_last_out_with_timestamp_ties_keeps_file_order(tmp_path):
    ds = load_dataset(csv_cfg(write_csv(tmp_path / "log.csv", TIES)))
    u = list(ds.user_ids).index("1")
    # sorted by time: 14 (50), 10 (100), then the ties at 200 in file order: 11, 12, 13
    assert raw_items(ds, u) == ["14", "10", "11", "12", "13"]
    np.testing.assert_array_equal(ds.ratings[u], [1, 5, 4, 3, 2])
    sp = Split.leave_last_out(ds)
    item, rating = sp.target(u, "test")
    assert (ds.item_ids[item], rating) == ("13", 2.0)
    assert ds.item_ids[sp.target(u, "val")[0]] == "12"
    assert [ds.item_ids[i] for i in sp.train_items(u)] == ["14", "10", "11"]


def test_users_with_fewer_than_3_interactions_have_no_eval_event(tmp_path):
    ds = load_dataset(csv_cfg(write_csv(tmp_path / "log.csv", TIES)))
    sp = Split.leave_last_out(ds)
    u1, u2 = list(ds.user_ids).index("1"), list(ds.user_ids).index("2")
    assert sp.eval_users.tolist() == [u1]
    assert sp.n_train[u2] == 2 and len(sp.train_items(u2)) == 2  # everything stays in training


def test_history_is_the_last_max_len_and_seen_is_everything(tmp_path):
    rows = "\n".join(f"7,{100 + k},3,{k}" for k in range(8))
    ds = load_dataset(csv_cfg(write_csv(tmp_path / "log.csv", "user_id,item_id,rating,timestamp\n" + rows)))
    sp = Split.leave_last_out(ds)
    items, ratings = sp.history(0, "test", max_len=3)
    assert [ds.item_ids[i] for i in items] == ["104", "105", "106"]  # test target is 107
    assert len(ratings) == 3
    assert [ds.item_ids[i] for i in sp.history(0, "val", max_len=2)[0]] == ["104", "105"]
    assert len(sp.history(0, "test")[0]) == 7
    assert [ds.item_ids[i] for i in sp.seen(0, "test")] == [str(100 + k) for k in range(7)]
    assert len(sp.seen(0, "val")) == 6


def test_train_item_counts_add_val_only_on_request(tmp_path):
    ds = load_dataset(csv_cfg(write_csv(tmp_path / "log.csv", TIES)))
    sp = Split.leave_last_out(ds)
    idx = ds.item_index()
    counts, with_val = sp.train_item_counts(), sp.train_item_counts(include_val=True)
    assert counts[idx["12"]] == 0 and with_val[idx["12"]] == 1  # user 1's val item
    assert counts[idx["13"]] == 0 and with_val[idx["13"]] == 0  # test item never counted
    assert counts[idx["20"]] == 1  # user 2 (no eval event) is all training


# ----------------------------------------------------------------------------- sources
def test_grouplens_layout(tmp_path):
    (tmp_path / "u.data").write_text("1\t1\t5\t300\n1\t2\t3\t100\n2\t1\t4\t50\n1\t3\t4\t200\n")
    (tmp_path / "u.item").write_bytes("1|Toy Story (1995)|01-Jan-1995\n2|Café (1990)|x\n3|Heat (1995)|x\n"
                                      .encode("latin-1"))
    ds = load_dataset(DataConfig(source="grouplens", path=str(tmp_path)))
    assert (ds.n_users, ds.n_items) == (2, 3)
    assert ds.item_text == ["Toy Story (1995)", "Café (1990)", "Heat (1995)"]
    assert raw_items(ds, 0) == ["2", "3", "1"]


def test_grouplens_without_path_or_file(tmp_path):
    with pytest.raises(DataError, match="data.path"):
        load_dataset(DataConfig(source="grouplens"))
    with pytest.raises(DataError, match="u.data"):
        load_dataset(DataConfig(source="grouplens", path=str(tmp_path)))


CUSTOM = dict(user_col="uid", item_col="iid", rating_col="stars", time_col="ts")
CUSTOM_FRAME = pd.DataFrame({"uid": ["x", "x", "x", "y"], "iid": ["b", "a", "c", "a"],
                             "stars": [1.0, 5.0, 4.0, 2.0], "ts": [3, 1, 2, 1]})


def check_custom(ds):
    assert (ds.n_users, ds.n_items) == (2, 3)
    assert raw_items(ds, 0) == ["a", "c", "b"]
    np.testing.assert_array_equal(ds.ratings[0], [5, 4, 1])
    assert ds.tasks == ["next_item", "rating", "like"]


@pytest.mark.filterwarnings("ignore:only 2 of 3 catalog items")
def test_generic_csv_with_custom_columns_and_item_text(tmp_path):
    CUSTOM_FRAME.to_csv(tmp_path / "log.csv", index=False)
    pd.DataFrame({"id": ["a", "b"], "name": ["Alpha", "Beta"]}).to_csv(tmp_path / "items.csv", index=False)
    ds = load_dataset(csv_cfg(tmp_path / "log.csv", items_path=str(tmp_path / "items.csv"), item_id_col="id",
                              item_text_cols=["name"], **CUSTOM))
    check_custom(ds)
    assert ds.item_text == ["Alpha", "Beta", "item c"]


# ----------------------------------------------------------------------------- item-text coverage
def test_item_text_coverage_is_reported_and_warns_below_90_percent(tmp_path):
    from distill.data import ItemTextWarning
    CUSTOM_FRAME.to_csv(tmp_path / "log.csv", index=False)
    pd.DataFrame({"id": ["a", "b"], "name": ["Alpha", "Beta"]}).to_csv(tmp_path / "items.csv", index=False)
    with pytest.warns(ItemTextWarning, match=r"only 2 of 3 catalog items \(67%\).*'id'.*\['c'\]"):
        ds = load_dataset(csv_cfg(tmp_path / "log.csv", items_path=str(tmp_path / "items.csv"), item_id_col="id",
                                  item_text_cols=["name"], **CUSTOM))
    cov = ds.stats()["item_text"]
    assert (cov["items"], cov["with_text"], cov["id_col"]) == (3, 2, "id")
    assert cov["coverage"] == pytest.approx(2 / 3) and "only 2 of 3" in cov["warning"]


def test_full_item_text_coverage_has_no_warning(tmp_path):
    import warnings
    CUSTOM_FRAME.to_csv(tmp_path / "log.csv", index=False)
    pd.DataFrame({"id": ["a", "b", "c", "z"], "name": ["A", "B", "C", "Z"]}).to_csv(tmp_path / "items.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        ds = load_dataset(csv_cfg(tmp_path / "log.csv", items_path=str(tmp_path / "items.csv"), item_id_col="id",
                                  item_text_cols=["name"], **CUSTOM))
    cov = ds.stats()["item_text"]
    assert (cov["with_text"], cov["coverage"]) == (3, 1.0) and "warning" not in cov  # the extra item z is ignored


def test_items_file_whose_ids_never_match_the_log_is_an_error(tmp_path):
    """'1' in the log vs 'sku_1' in the item file: every text would be a placeholder, silently."""
    pd.DataFrame({"user_id": [1, 1, 1], "item_id": [1, 2, 3], "rating": [4, 5, 3], "timestamp": [1, 2, 3]}
                 ).to_csv(tmp_path / "log.csv", index=False)
    pd.DataFrame({"item_id": ["sku_1", "sku_2", "sku_3"], "title": ["A", "B", "C"]}).to_csv(tmp_path / "items.csv",
                                                                                          index=False)
    with pytest.raises(DataError, match=r"none of the 3 catalog items.*'item_id' \(data.item_id_col\).*"
                                        r"\['1', '2', '3'\].*\['sku_1', 'sku_2', 'sku_3'\]"):
        load_dataset(DataConfig(source="csv", path=str(tmp_path / "log.csv"), items_path=str(tmp_path / "items.csv")))


def test_without_an_item_file_the_stats_say_texts_are_placeholders(tmp_path):
    CUSTOM_FRAME.to_csv(tmp_path / "log.csv", index=False)
    cov = load_dataset(csv_cfg(tmp_path / "log.csv", **CUSTOM)).stats()["item_text"]
    assert (cov["source"], cov["with_text"], cov["coverage"]) == (None, 0, 0.0) and "items_path" in cov["warning"]


def test_generic_parquet_with_custom_columns(tmp_path):
    CUSTOM_FRAME.to_parquet(tmp_path / "log.parquet")
    check_custom(load_dataset(DataConfig(source="parquet", path=str(tmp_path / "log.parquet"), **CUSTOM)))


def test_without_rating_column_only_next_item(tmp_path):
    CUSTOM_FRAME.drop(columns="stars").to_csv(tmp_path / "log.csv", index=False)
    ds = load_dataset(csv_cfg(tmp_path / "log.csv", **{**CUSTOM, "rating_col": None}))
    assert ds.tasks == ["next_item"] and ds.ratings is None and not ds.has_ratings
    sp = Split.leave_last_out(ds)
    items, ratings = sp.targets(sp.eval_users, "test")
    assert ratings is None and ds.item_ids[items[0]] == "b"


def test_without_time_column_file_order_is_time(tmp_path):
    CUSTOM_FRAME.to_csv(tmp_path / "log.csv", index=False)
    ds = load_dataset(csv_cfg(tmp_path / "log.csv", **{**CUSTOM, "time_col": None}))
    assert raw_items(ds, 0) == ["b", "a", "c"]


# ----------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.csv"):
        load_dataset(csv_cfg(tmp_path / "nope.csv"))


def test_missing_column(tmp_path):
    CUSTOM_FRAME.to_csv(tmp_path / "log.csv", index=False)
    with pytest.raises(DataError, match="stars"):
        load_dataset(csv_cfg(tmp_path / "log.csv", **{**CUSTOM, "rating_col": "stars", "user_col": "user"}))
    with pytest.raises(DataError, match="'user'"):
        load_dataset(csv_cfg(tmp_path / "log.csv", **{**CUSTOM, "user_col": "user"}))


@pytest.mark.parametrize("content", ["", "user_id,item_id,rating,timestamp\n"])
def test_empty_file(tmp_path, content):
    (tmp_path / "log.csv").write_text(content)
    with pytest.raises(DataError, match="log.csv"):
        load_dataset(csv_cfg(tmp_path / "log.csv"))


def test_non_numeric_rating(tmp_path):
    write_csv(tmp_path / "log.csv", "uid,iid,stars,ts\nx,a,5,1\nx,b,great,2\n")
    with pytest.raises(DataError, match="'stars'.*great"):
        load_dataset(csv_cfg(tmp_path / "log.csv", **CUSTOM))


def test_bad_time_and_source(tmp_path):
    write_csv(tmp_path / "log.csv", "uid,iid,stars,ts\nx,a,5,yesterday-ish\n")
    with pytest.raises(DataError, match="'ts'"):
        load_dataset(csv_cfg(tmp_path / "log.csv", **CUSTOM))
    with pytest.raises(ValueError, match="data.source='json'"):  # rejected by the config, before any loading
        load_dataset(DataConfig(source="json"))


def test_ragged_rows_and_string_factorization_match_the_list_and_np_unique_paths():
    """The CSR layout indexes like the list of per-user arrays it replaced, and factorize_as_str gives
    np.unique(values.astype(str))'s answer (lexicographic string order: "10" < "9") without per-row strings."""
    import pandas as pd

    from distill.data import Ragged, factorize_as_str
    rows = [np.array([3, 1]), np.array([], dtype=np.int64), np.array([7, 7, 2])]
    r = Ragged(np.concatenate(rows).astype(np.int64), np.array([0, 2, 2, 5]))
    assert len(r) == 3 and r.lengths().tolist() == [2, 0, 3]
    assert all(np.array_equal(a, b) for a, b in zip(r, rows)) and np.array_equal(r[-1], rows[2])
    assert [x.tolist() for x in r[1:]] == [[], [7, 7, 2]]
    with pytest.raises(IndexError):
        r[3]
    with pytest.raises(ValueError, match="offsets"):
        Ragged(np.arange(3), np.array([0, 2]))
    for values in (np.array([10, 9, 100, 9, 1]), np.array(["b", "a10", "a9", "b"]), np.array([1.0, 2.5, 1.0]),
                   pd.Series([5, 3, 5], dtype="int32")):
        want_ids, want_codes = np.unique(pd.Series(values).astype(str).to_numpy(), return_inverse=True)
        ids, codes = factorize_as_str(values)
        assert ids.tolist() == want_ids.tolist() and codes.tolist() == want_codes.tolist()


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_logs_are_read_by_columns(tmp_path, suffix):
    """Only the configured columns are read (a wide log's other columns cost nothing); a missing one is named with
    the fix; CSV (pyarrow's parser), TSV and Parquet give the same frame."""
    import pandas as pd
    from distill.data import DataError, read_columns
    df = pd.DataFrame({"u": [3, 1, 2], "i": ["a", "b", "a"], "r": [4.0, 5.0, 1.5], "junk": ["x" * 50] * 3,
                       "t": [30, 10, 20]})
    path = tmp_path / f"log{suffix}"
    if suffix == ".parquet":
        df.to_parquet(path)
    else:
        df.to_csv(path, sep="\t" if suffix == ".tsv" else ",", index=False)
    got = read_columns(path, ["u", "i", "r", "t"], "hint")
    assert list(got.columns) == ["u", "i", "r", "t"]
    pd.testing.assert_frame_equal(got, df[["u", "i", "r", "t"]], check_dtype=False)
    with pytest.raises(DataError, match=r"\['when'\] not found.*set the columns"):
        read_columns(path, ["u", "when"], "set the columns")


def test_a_corrupt_parquet_log_is_a_clear_error(tmp_path):
    from distill.data import DataError, read_columns
    path = tmp_path / "log.parquet"
    path.write_bytes(b"u,i\n1,2\n")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_columns(path, ["u", "i"], "hint")
