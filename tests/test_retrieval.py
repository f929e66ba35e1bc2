"""export.retrieval: exact top-k equals a brute-force stable sort; the faiss ANN retriever keeps recall@10 >= 0.95
on a clustered catalog with seen-item exclusion, never returns banned / inactive / not-allowed ids, widens and
falls back to exact when needed, and refuses an index file saved for another table. Small, seeded catalogs."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export import retrieval
from export.retrieval import (AnnRetriever, AnnUnavailableWarning, ExactRetriever, build_retriever, recall_at_k,
                              top_k_indices)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- helpers

def clustered(n, d=32, n_queries=50, k_centres=50, seed=0):
    """Realistic-ish table: items and queries around 50 N(0,1) centres (0.5 spread), bias ~ N(0, 0.5)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k_centres, d)).astype(np.float32)
    vectors = (centres[rng.integers(0, k_centres, n)] + 0.5 * rng.standard_normal((n, d))).astype(np.float32)
    bias = (0.5 * rng.standard_normal(n)).astype(np.float32)
    queries = (centres[rng.integers(0, k_centres, n_queries)]
               + 0.5 * rng.standard_normal((n_queries, d))).astype(np.float32)
    return vectors, bias, queries


def integer_table(n=300, d=4, seed=1):
    """Small-integer vectors and biases: float32 matmuls are exact, so there are many exact ties."""
    rng = np.random.default_rng(seed)
    vectors = rng.integers(-2, 3, (n, d)).astype(np.float32)
    bias = rng.integers(-1, 2, n).astype(np.float32)
    queries = rng.integers(-2, 3, (6, d)).astype(np.float32)
    active = rng.random(n) > 0.2
    return vectors, bias, active, queries


def brute_force(vectors, bias, active, u, k, banned=None, allow=None):
    """Full stable sort over the eligible rows: the reference answer."""
    eligible = active.copy()
    if banned is not None:
        eligible[np.asarray(list(banned), dtype=np.int64)] = False
    if allow is not None:
        allowed = np.zeros_like(eligible)
        allowed[np.asarray(list(allow), dtype=np.int64)] = True
        eligible &= allowed
    ids = np.flatnonzero(eligible)
    s = vectors[ids] @ u + bias[ids]
    order = np.argsort(-s, kind="stable")[:k]
    return ids[order], s[order]


def exact_top(vectors, bias, u, n):
    """Ids of the n highest exact scores of one query (no exclusion)."""
    s = vectors @ u + bias
    part = np.argpartition(-s, n)[:n]
    return part[np.argsort(-s[part], kind="stable")]


# ----------------------------------------------------------------------------------------- top_k_indices

def test_top_k_indices_matches_stable_sort_with_ties_nan_banned():
    rng = np.random.default_rng(0)
    for trial in range(30):
        s = rng.integers(0, 5, 40).astype(np.float64)
        s[rng.random(40) < 0.15] = np.nan
        banned = set(rng.choice(40, rng.integers(0, 10), replace=False).tolist())
        k = int(rng.integers(1, 45))
        keep = np.array([i for i in range(40) if i not in banned])
        vals = np.where(np.isnan(s[keep]), -np.inf, s[keep])
        want = keep[np.argsort(-vals, kind="stable")][:k]
        np.testing.assert_array_equal(top_k_indices(s, k, banned=banned or None), want)


# ------------------------------------------------------------------------------------------------ exact

@pytest.mark.parametrize("max_score_bytes", [256 << 20, 1])  # one block / one row per block
def test_exact_equals_brute_force_with_ties_banned_allow_inactive(max_score_bytes):
    vectors, bias, active, queries = integer_table()
    rng = np.random.default_rng(2)
    banned = [None, set(rng.choice(300, 40, replace=False).tolist()), rng.choice(300, 5).astype(np.int64),
              None, np.array([], dtype=np.int64), set(range(0, 300, 2))]
    allow = [None, None, None, rng.choice(300, 30, replace=False), rng.choice(300, 8, replace=False),
             np.arange(0, 300, 3)]
    ret = ExactRetriever(vectors, bias, active, max_score_bytes=max_score_bytes)
    for k in (1, 7, 50, 400):
        got = ret.search(queries, k, banned=banned, allow=allow)
        assert len(got) == len(queries)
        for i, (ids, scores) in enumerate(got):
            want_ids, want_scores = brute_force(vectors, bias, active, queries[i], k, banned[i], allow[i])
            assert ids.dtype == np.int64 and scores.dtype == np.float32
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_array_equal(scores, want_scores)


def test_exact_returns_fewer_when_few_eligible_and_never_inactive():
    vectors, bias, active, queries = integer_table(n=20)
    active[:] = False
    active[[3, 11]] = True
    ids, scores = ExactRetriever(vectors, bias, active).search(queries[:1], 10)[0]
    assert sorted(ids.tolist()) == [3, 11] and scores.shape == (2,)
    ids, _ = ExactRetriever(vectors, bias, active).search(queries[:1], 10, banned=[{3}])[0]
    assert ids.tolist() == [11]


# -------------------------------------------------------------------------------------------------- ANN

@pytest.fixture(scope="module")
def catalog():
    vectors, bias, queries = clustered(20_000, d=32, n_queries=60)
    active = np.random.default_rng(3).random(20_000) > 0.05
    rng = np.random.default_rng(4)
    # seen items: 50 per query, drawn from its exact top-100 (realistic: history is near the user)
    banned = [set(rng.choice(exact_top(vectors, bias, u, 100), 50, replace=False).tolist()) for u in queries]
    return vectors, bias, active, queries, banned


@pytest.fixture(scope="module", params=["ivf", "hnsw"])
def ann(request, catalog):
    pytest.importorskip("faiss")
    vectors, bias, active, _, _ = catalog
    small = {"ivf": dict(nlist=256, nprobe=32), "hnsw": {}}[request.param]  # hnsw: the real defaults
    return AnnRetriever(vectors, bias, active, index_type=request.param, build_threads=1, **small)


def test_ann_recall_at_10_with_seen_exclusion(ann, catalog):
    vectors, bias, active, queries, banned = catalog
    exact = ExactRetriever(vectors, bias, active).search(queries, 10, banned=banned)
    approx = ann.search(queries, 10, banned=banned)
    assert recall_at_k(exact, approx, 10) >= 0.95
    assert ann.build_seconds > 0 and ann.memory_bytes() > vectors[active].nbytes
    for (ids, scores), u in zip(approx, queries):  # returned scores are exact, best first
        np.testing.assert_allclose(scores, vectors[ids] @ u + bias[ids], rtol=1e-5, atol=1e-5)
        assert np.all(np.diff(scores) <= 0)


def test_ann_never_returns_banned_or_inactive_even_when_banned_covers_true_top_k(ann, catalog):
    vectors, bias, active, queries, _ = catalog
    top = [exact_top(vectors, bias, u, 60) for u in queries]
    banned = [t[:50] for t in top]  # the whole true top-50 (top-10 many times over) is seen
    inactive = np.flatnonzero(~active)
    got = ann.search(queries, 10, banned=banned)
    exact = ExactRetriever(vectors, bias, active).search(queries, 10, banned=banned)
    for (ids, _), b in zip(got, banned):
        assert len(ids) == 10
        assert not np.isin(ids, b).any() and not np.isin(ids, inactive).any()
    assert recall_at_k(exact, got, 10) >= 0.9


def test_ann_allow_list_equals_exact_over_allowed_subset(ann, catalog):
    vectors, bias, active, queries, banned = catalog
    rng = np.random.default_rng(5)
    allow = [rng.choice(20_000, 500, replace=False) for _ in range(len(queries))]
    allow[0] = None  # rows mix: ANN for this one, exact allow-list for the others
    got = ann.search(queries, 10, banned=banned, allow=allow)
    want = ExactRetriever(vectors, bias, active).search(queries, 10, banned=banned, allow=allow)
    for i in range(1, len(queries)):
        np.testing.assert_array_equal(got[i][0], want[i][0])
        np.testing.assert_array_equal(got[i][1], want[i][1])
        assert np.isin(got[i][0], allow[i]).all() and active[got[i][0]].all()
    assert not np.isin(got[0][0], list(banned[0])).any()


def test_ann_widens_when_probed_lists_are_too_small():
    pytest.importorskip("faiss")
    vectors, bias, queries = clustered(2_000, d=16, n_queries=5, seed=7)
    # 50 lists of ~40 items, one probed, no margin: k' = 10 + 45 banned exceeds what one list can hold
    ret = AnnRetriever(vectors, bias, index_type="ivf", nlist=50, nprobe=1, margin=0, build_threads=1)
    banned = [exact_top(vectors, bias, u, 45) for u in queries]
    got = ret.search(queries, 10, banned=banned)
    assert ret.stats["widened"] > 0
    for (ids, _), b in zip(got, banned):
        assert len(ids) == 10 and not np.isin(ids, b).any()


@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
def test_ann_falls_back_to_exact_when_too_few_eligible(index_type):
    pytest.importorskip("faiss")
    vectors, bias, queries = clustered(2_000, d=16, n_queries=3, seed=8)
    active = np.ones(2_000, dtype=bool)
    active[:100] = False
    ret = AnnRetriever(vectors, bias, active, index_type=index_type, nlist=40, nprobe=1, max_widen=1,
                       build_threads=1)
    keep = np.array([5, 150, 999, 1_999])  # 5 is inactive: only 3 eligible
    banned = [np.setdiff1d(np.arange(2_000), keep)] * 3
    got = ret.search(queries, 10, banned=banned)
    want = ExactRetriever(vectors, bias, active).search(queries, 10, banned=banned)
    assert ret.stats["exact_fallback"] == 3
    for (ids, scores), (w_ids, w_scores) in zip(got, want):
        assert sorted(ids.tolist()) == [150, 999, 1_999]
        np.testing.assert_array_equal(ids, w_ids)
        np.testing.assert_allclose(scores, w_scores, rtol=1e-6)  # one-row vs batched matmul: last bits


def test_ann_max_widen_zero_falls_back_to_exact_result():
    pytest.importorskip("faiss")
    vectors, bias, queries = clustered(2_000, d=16, n_queries=4, seed=9)
    ret = AnnRetriever(vectors, bias, index_type="ivf", nlist=50, nprobe=1, margin=0, max_widen=0,
                       build_threads=1)
    banned = [exact_top(vectors, bias, u, 45) for u in queries]
    got = ret.search(queries, 10, banned=banned)
    want = ExactRetriever(vectors, bias).search(queries, 10, banned=banned)
    assert ret.stats["exact_fallback"] > 0 and ret.stats["widened"] == 0
    for (ids, _), (w_ids, _), b in zip(got, want, banned):
        assert len(ids) == 10 and not np.isin(ids, b).any()
    fell_back = [i for i, (ids, _) in enumerate(got) if np.array_equal(ids, want[i][0])]
    assert len(fell_back) >= ret.stats["exact_fallback"]


# ------------------------------------------------------------------------------------------ save / load

@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
def test_save_load_round_trip_and_mismatch_refused(tmp_path, index_type):
    pytest.importorskip("faiss")
    vectors, bias, queries = clustered(3_000, d=16, n_queries=8, seed=10)
    active = np.random.default_rng(11).random(3_000) > 0.1
    ret = AnnRetriever(vectors, bias, active, index_type=index_type, build_threads=1)
    banned = [exact_top(vectors, bias, u, 20) for u in queries]
    before = ret.search(queries, 10, banned=banned)
    ret.save(tmp_path / "idx")
    loaded = AnnRetriever.load(tmp_path / "idx", vectors, bias, active)
    after = loaded.search(queries, 10, banned=banned)
    for (a, sa), (b, sb) in zip(before, after):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(sa, sb)
    assert loaded.params() == ret.params() and loaded.build_seconds == pytest.approx(ret.build_seconds)

    with pytest.raises(ValueError, match="N=3000, d=16 but this table has N=2999"):
        AnnRetriever.load(tmp_path / "idx", vectors[:-1], bias[:-1], active[:-1])
    with pytest.raises(ValueError, match="d=16 but this table has N=3000, d=15"):
        AnnRetriever.load(tmp_path / "idx", vectors[:, :15], bias, active)
    changed_bias = bias.copy()
    changed_bias[7] += 1
    with pytest.raises(ValueError, match="fingerprint"):
        AnnRetriever.load(tmp_path / "idx", vectors, changed_bias, active)
    changed_active = active.copy()
    changed_active[0] = not changed_active[0]
    with pytest.raises(ValueError, match="fingerprint"):
        AnnRetriever.load(tmp_path / "idx", vectors, bias, changed_active)
    with pytest.raises(FileNotFoundError, match="not a saved retrieval index"):
        AnnRetriever.load(tmp_path / "nothing", vectors, bias, active)


# ---------------------------------------------------------------------------------------- build_retriever

def test_auto_picks_exact_below_threshold_and_ann_above():
    vectors, bias, _ = clustered(1_682, d=8, n_queries=1)
    assert isinstance(build_retriever(vectors, bias), ExactRetriever)  # ML-100K size, default threshold
    assert isinstance(build_retriever(vectors, bias, mode="exact"), ExactRetriever)
    pytest.importorskip("faiss")
    ret = build_retriever(vectors, bias, ann_min_items=1_000, index_type="hnsw", M=8, build_threads=1)
    assert isinstance(ret, AnnRetriever) and ret.M == 8
    assert isinstance(build_retriever(vectors, bias, mode="ann", build_threads=1), AnnRetriever)


def test_without_faiss_ann_raises_and_auto_warns(monkeypatch):
    vectors, bias, _ = clustered(500, d=8, n_queries=1)
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    assert not retrieval.faiss_available()
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        build_retriever(vectors, bias, mode="ann")
    with pytest.warns(AnnUnavailableWarning, match="pip install faiss-cpu"):
        ret = build_retriever(vectors, bias, ann_min_items=100)
    assert isinstance(ret, ExactRetriever)


def test_module_imports_without_faiss_and_without_torch():
    code = ("import sys; sys.modules['faiss'] = None\n"
            "import numpy as np, export.retrieval as r\n"
            "ids, s = r.ExactRetriever(np.eye(3, dtype=np.float32), np.zeros(3, np.float32)).search("
            "np.ones((1, 3), np.float32), 2)[0]\n"
            "assert len(ids) == 2\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'distill')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ------------------------------------------------------------------------------------------------ errors

def test_query_and_k_errors():
    vectors, bias, active, queries = integer_table()
    ret = ExactRetriever(vectors, bias, active)
    with pytest.raises(ValueError, match="dim 5 but the item vectors have dim 4"):
        ret.search(np.ones((1, 5), np.float32), 3)
    with pytest.raises(ValueError, match=r"2-D.*u\[None, :\]"):
        ret.search(np.ones(4, np.float32), 3)
    with pytest.raises(ValueError, match="dtype int64"):
        ret.search(np.ones((1, 4), np.int64), 3)
    nan = queries.copy()
    nan[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf \(rows \[2\]\)"):
        ret.search(nan, 3)
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            ret.search(queries, k)
    with pytest.raises(ValueError, match="banned has 1 entries but there are 6 query rows"):
        ret.search(queries, 3, banned=[{1}])
    with pytest.raises(ValueError, match="outside"):
        ret.search(queries[:1], 3, banned=[[300]])
    with pytest.raises(ValueError, match="single int"):
        ret.search(queries[:2], 3, allow=[1, 2])
    with pytest.raises(ValueError, match="list with one entry per query row"):
        ret.search(queries[:1], 3, banned=np.array([1, 2]))


def test_table_errors():
    vectors, bias, active, _ = integer_table()
    with pytest.raises(ValueError, match=r"bias must have shape \(300,\)"):
        ExactRetriever(vectors, bias[:-1], active)
    with pytest.raises(ValueError, match=r"active must have shape \(300,\)"):
        ExactRetriever(vectors, bias, active[:10])
    with pytest.raises(ValueError, match="active must be a bool mask"):
        ExactRetriever(vectors, bias, active.astype(np.int64))
    with pytest.raises(ValueError, match="2-D array"):
        ExactRetriever(vectors[0], bias, active)
    bad = vectors.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="vectors contain NaN"):
        ExactRetriever(bad, bias, active)
    with pytest.raises(ValueError, match="mode must be"):
        build_retriever(vectors, bias, active, mode="fast")
    with pytest.raises(ValueError, match="given with mode='exact'"):
        build_retriever(vectors, bias, active, mode="exact", nprobe=4)


def test_ann_param_errors():
    pytest.importorskip("faiss")
    vectors, bias, _ = clustered(500, d=8, n_queries=1)
    with pytest.raises(ValueError, match="index_type must be"):
        AnnRetriever(vectors, bias, index_type="pq")
    with pytest.raises(ValueError, match="nprobe must be a positive integer"):
        AnnRetriever(vectors, bias, nprobe=0)
    with pytest.raises(ValueError, match="no active items"):
        AnnRetriever(vectors, bias, np.zeros(500, bool), build_threads=1)


def test_recall_at_k():
    e = [(np.array([1, 2, 3]), None), (np.array([], np.int64), None)]
    a = [(np.array([3, 9, 1]), None), (np.array([4]), None)]
    assert recall_at_k(e, a, 3) == pytest.approx((2 / 3 + 1) / 2)
    assert recall_at_k(e, a, 1) == pytest.approx((0 + 1) / 2)
    with pytest.raises(ValueError, match="rows"):
        recall_at_k(e, a[:1], 3)
