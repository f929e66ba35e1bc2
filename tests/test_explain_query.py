"""recommend(explain=True) and recommend(query=...) in the torch-free runtime (export/runtime.py,
export/query_encoder.py), through the HTTP service and its micro-batcher, and the latency bench script.

Every answer is checked against a numpy reference computed here from the exported arrays: cosine similarities
over the item table's (or its text) vectors for explain; (u + w q_hat) @ v + b with the seen items removed for a
query, q_hat summed from the token rows of the words' first tokens. The query folder is built here: a small
WordLevel tokenizer and seeded random token vectors of the item vectors' width, in a copy of conftest's tiny
exported model (the session fixture's folder is shared, so it is never modified).
"""
import json
import re
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from export import contract as C
from export.batching import MicroBatcher, RecommendJob, recommend_rows
from export.item_table import append_items, load_table, write_table
from export.query_encoder import QueryEncoder
from export.runtime import Recommender, RequestError, RuntimeArtifactError

WORDS = ["[UNK]", "space", "war", "love", "robot", "ocean", "night", "city", "dream", "pointer"]
"""The test vocabulary: token id = position. [UNK] (what an unknown word becomes) has a zero row."""
WEIGHT = 2.5
MAX_CHARS = 500


# ------------------------------------------------------------------------------------------------ builders
def _tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def _token_vectors(dim: int, pointer_at=None, seed: int = 7) -> np.ndarray:
    vec = np.random.default_rng(seed).normal(size=(len(WORDS), dim)).astype(np.float32)
    vec[0] = 0.0  # [UNK]
    if pointer_at is not None:
        vec[WORDS.index("pointer")] = 100.0 * pointer_at
    return vec


def write_query_folder(folder: Path, vectors: np.ndarray, **meta) -> Path:
    """A complete query folder (tokenizer.json, token_vectors.npy, meta.json); `meta` overrides fields."""
    folder.mkdir(parents=True, exist_ok=True)
    _tokenizer(folder / "tokenizer.json")
    np.save(folder / "token_vectors.npy", vectors)
    m = {"format": "distillrec-query-encoder", "version": 1, "dim": int(vectors.shape[1]), "vocab": len(vectors),
         "lowercase": True, "word_prefix": " ", "pooling": "sum", "weight": WEIGHT, "max_query_chars": MAX_CHARS,
         "item_table_version": 1, "source": "tests/test_explain_query.py: random token vectors"}
    m.update(meta)
    (folder / "meta.json").write_text(json.dumps(m))
    return folder


def _copy_export(serving_export, dest: Path) -> Path:
    shutil.copytree(serving_export.onnx_dir, dest)
    return dest


@pytest.fixture(scope="module")
def table(serving_export):
    return load_table(C.item_table_dir(serving_export.onnx_dir))


@pytest.fixture(scope="module")
def pointed(table):
    """The item the "pointer" word points at: the largest-norm item, so that v_t @ v_i <= |v_t|^2 for every i
    (Cauchy-Schwarz) and a query along v_t ranks it first once its weight dominates."""
    return int(np.argmax(np.linalg.norm(table.vectors, axis=1)))


@pytest.fixture(scope="module")
def onnx_q(serving_export, table, pointed, tmp_path_factory):
    """A copy of the tiny export with a query folder."""
    d = _copy_export(serving_export, tmp_path_factory.mktemp("query_export") / "onnx")
    write_query_folder(d / "query", _token_vectors(table.dim, table.vectors[pointed]))
    return d


@pytest.fixture(scope="module")
def rec(onnx_q):
    return Recommender(onnx_q, retrieval="exact")


@pytest.fixture(scope="module")
def rec_pop(onnx_q):
    return Recommender(onnx_q, empty_history="popularity", retrieval="exact")


@pytest.fixture(scope="module")
def plain_rec(serving_export):
    """The export without a query folder."""
    return Recommender(serving_export.onnx_dir)


def _histories(ids, n, seed=0, lo=1, hi=15):
    """Seeded histories of known ids, some longer than max_history (10), some with repeated ids."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h = list(rng.choice(ids, size=int(rng.integers(lo, hi)), replace=True))
        out.append(h + h[:2] if i % 3 == 0 else h)
    return out


# ------------------------------------------------------------------------------------------------ references
def _fed_history(h, index, max_history):
    """The distinct known ids of the history the model was fed (its last max_history known ids)."""
    known = [index[x] for x in h if x in index][-max_history:]
    return list(dict.fromkeys(known))


def _explain_ref(space: np.ndarray, item: int, fed: list, k: int) -> list:
    """Top-k (row, cosine) of the history rows against `item`, the item itself left out."""
    unit = space / np.linalg.norm(space, axis=1, keepdims=True)
    cand = [h for h in fed if h != item]
    sims = unit[cand] @ unit[item]
    order = np.argsort(-sims, kind="stable")[:k]
    return [(cand[j], float(sims[j])) for j in order]


def _q_hat(words: list, vectors: np.ndarray) -> np.ndarray:
    """The encoding rule by hand: the first (here: only) token of each lowercased word, summed, normalised."""
    q = sum(vectors[WORDS.index(w) if w in WORDS else 0].astype(np.float64) for w in words)
    return q / np.linalg.norm(q)


def _user_vector(rec, history) -> np.ndarray:
    """u of one history through the runtime's own encoder session (the two-part model's first output)."""
    items, rates, length = rec.encode_histories([history])
    feed = {"history_vectors": rec.catalog.table.vectors[items], "history_ratings": rates, "history_length": length}
    return rec.session.run([rec.output_names[0]], feed)[0][0]


def _ranked_ref(table, u, banned, k):
    s = table.vectors.astype(np.float64) @ u + table.bias
    s[list(banned)] = -np.inf
    order = np.argsort(-s, kind="stable")[:k]
    return [table.ids[i] for i in order], s[order]


# ------------------------------------------------------------------------------------------------ explain
@pytest.mark.parametrize("space", ["item", "text"])
def test_explain_equals_a_numpy_cosine_reference(serving_export, table, space):
    rec = Recommender(serving_export.onnx_dir, explain_space=space)
    vectors = table.vectors if space == "item" else table.arrays["text"]
    hist = _histories(serving_export.item_ids, 8)
    plain = rec.recommend_batch(hist, k=8)
    got = rec.recommend_batch(hist, k=8, explain=True)
    for h, p, g in zip(hist, plain, got):
        assert [(i, s) for i, s, _ in g] == p  # explain never changes the answer
        fed = _fed_history(h, table.index, serving_export.max_history)
        for item, _, because in g:
            want = _explain_ref(vectors, table.index[item], fed, 3)
            assert [b[0] for b in because] == [table.ids[r] for r, _ in want]
            np.testing.assert_allclose([b[1] for b in because], [s for _, s in want], rtol=1e-5, atol=1e-5)
            assert len(because) == min(3, len(fed))  # seen items are excluded, so never the item itself


def test_explain_leaves_out_the_item_itself_and_counts_duplicates_once(serving_export, table):
    rec = Recommender(serving_export.onnx_dir, explain_k=5)
    h = ["m103", "m107", "m103", "m107", "m120"]
    got = rec.recommend(h, k=serving_export.n_items, exclude_seen=False, explain=True)
    assert {i for i, _, _ in got} >= {"m103", "m107", "m120"}
    for item, _, because in got:
        ids = [b for b, _ in because]
        assert item not in ids and len(ids) == len(set(ids)) and set(ids) <= set(h)
        assert len(ids) == (2 if item in h else 3)  # 3 distinct history items, minus the item itself
        sims = [s for _, s in because]
        assert sims == sorted(sims, reverse=True) and all(-1 - 1e-6 <= s <= 1 + 1e-6 for s in sims)


def test_explain_uses_the_truncated_known_history(serving_export, table):
    rec = Recommender(serving_export.onnx_dir, unknown_items="drop", explain_k=20)
    ids = serving_export.item_ids
    h = ids[:6] + ["not-an-item"] + ids[6:14]  # 14 known ids: the model reads the last 10
    fed = {table.ids[r] for r in _fed_history(h, table.index, serving_export.max_history)}
    assert fed == set(ids[4:14])
    for item, _, because in rec.recommend(h, k=5, explain=True):
        assert {b for b, _ in because} == fed - {item}


def test_explain_of_an_empty_history_answered_by_popularity_is_empty(serving_export):
    rec = Recommender(serving_export.onnx_dir, empty_history="popularity", unknown_items="drop")
    got = rec.recommend_batch([["zzz"], ["m101", "m102"]], k=3, explain=True)
    assert [b for _, _, b in got[0]] == [[], [], []]
    assert all(len(b) == 2 for _, _, b in got[1])
    assert [(i, s) for i, s, _ in got[0]] == rec.recommend(["zzz"], k=3)


def test_explain_norms_follow_a_reload(serving_export, tmp_path):
    d = _copy_export(serving_export, tmp_path / "onnx")
    rec = Recommender(d, explain_k=3)
    old = load_table(C.item_table_dir(d))
    rng = np.random.default_rng(11)
    new = {name: rng.normal(size=(2,) + a.shape[1:]).astype(np.float32)
           for name, a in old.arrays.items() if name in ("vectors", "rating", "like", "text")}
    new["bias"] = np.zeros(2, np.float32)
    append_items(C.item_table_dir(d), ["new1", "new2"], new)
    assert rec.reload()
    table = rec.catalog.table
    h = ["m101", "new1", "new2", "m130"]
    fed = [table.index[x] for x in h]
    for item, _, because in rec.recommend(h, k=6, explain=True):
        want = _explain_ref(table.vectors, table.index[item], fed, 3)
        assert [b for b, _ in because] == [table.ids[r] for r, _ in want]
        np.testing.assert_allclose([s for _, s in because], [s for _, s in want], rtol=1e-5, atol=1e-5)


def test_explain_space_text_needs_text_vectors(serving_export, tmp_path):
    d = _copy_export(serving_export, tmp_path / "onnx")
    t = load_table(C.item_table_dir(d), mmap=False)
    arrays = {k: v for k, v in t.arrays.items() if k != "text"}
    write_table(C.item_table_dir(d), t.ids, arrays, model_id=t.meta.get("model_id"))
    assert Recommender(d).recommend(["m101"], k=2, explain=True)  # item space: fine
    with pytest.raises(RuntimeArtifactError, match=r"explain_space='text'.*text\.npy.*explain_space='item'"):
        Recommender(d, explain_space="text")


@pytest.mark.parametrize("kwargs,match", [({"explain_k": 0}, "explain_k"), ({"explain_k": True}, "explain_k"),
                                          ({"explain_space": "words"}, "explain_space"),
                                          ({"use_query_encoder": "yes"}, "use_query_encoder")])
def test_bad_explain_settings_are_value_errors(serving_export, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Recommender(serving_export.onnx_dir, **kwargs)


def test_explain_must_be_a_bool(plain_rec):
    for bad in ("yes", 1, None):
        with pytest.raises(RequestError, match="explain must be true or false"):
            plain_rec.recommend(["m101"], explain=bad)


# ------------------------------------------------------------------------------------------------ query
def test_encode_query_follows_the_encoding_rule(rec, onnx_q):
    vectors = np.load(onnx_q / "query" / "token_vectors.npy")
    assert rec.has_query_encoder and rec.query_encoder.weight == WEIGHT
    assert rec.query_encoder.item_table_version == 1
    got = rec.encode_query("  Space WAR, robot's dream-city!  ")
    # words: space, war, robot's, dream-city; the tokenizer splits the last two, their FIRST tokens count
    np.testing.assert_allclose(got, _q_hat(["space", "war", "robot", "dream"], vectors), rtol=1e-6, atol=1e-6)
    assert got.dtype == np.float32 and got.shape == (vectors.shape[1],)
    np.testing.assert_allclose(rec.encode_query("ocean night ocean"),
                               _q_hat(["ocean", "night", "ocean"], vectors), rtol=1e-6, atol=1e-6)
    batch = rec.query_encoder.encode_batch(["love", "city love"])
    np.testing.assert_allclose(batch, [_q_hat(["love"], vectors), _q_hat(["city", "love"], vectors)], atol=1e-6)


def test_mean_pooling_gives_the_same_direction(onnx_q, table, tmp_path):
    vectors = np.load(onnx_q / "query" / "token_vectors.npy")
    mean = QueryEncoder.load(write_query_folder(tmp_path / "q", vectors, pooling="mean"), expected_dim=table.dim)
    np.testing.assert_allclose(mean.encode("space love"), _q_hat(["space", "love"], vectors), atol=1e-6)


def test_query_equals_a_numpy_reference(rec, onnx_q, table, serving_export):
    vectors = np.load(onnx_q / "query" / "token_vectors.npy")
    hist = _histories(serving_export.item_ids, 6, seed=1)
    texts = ["space war", "Love in the city", "robot", "ocean dream night", "war war love", "night"]
    got = rec.recommend_batch(hist, k=7, queries=texts)
    changed = 0
    for h, text, row in zip(hist, texts, got):
        u = _user_vector(rec, h).astype(np.float64)
        words = [w for w in text.lower().split()]
        shifted = u + WEIGHT * _q_hat(words, vectors)
        ids, scores = _ranked_ref(table, shifted, {table.index[x] for x in h}, 7)
        assert [i for i, _ in row] == ids
        np.testing.assert_allclose([s for _, s in row], scores, rtol=1e-4, atol=1e-4)
        alone = rec.recommend(h, k=7, query=text)  # batch row == batch-1 answer (up to padding's last bits)
        assert [i for i, _ in alone] == ids
        np.testing.assert_allclose([s for _, s in alone], scores, rtol=1e-4, atol=1e-4)
        changed += [i for i, _ in row] != [i for i, _ in rec.recommend(h, k=7)]
    assert changed >= 3  # the query steers the answer (a reference of u alone would fail above)


def test_a_query_pointing_at_an_item_puts_it_first(serving_export, table, pointed, tmp_path):
    d = _copy_export(serving_export, tmp_path / "onnx")
    write_query_folder(d / "query", _token_vectors(table.dim, table.vectors[pointed]), weight=1000.0)
    r = Recommender(d)
    target = table.ids[pointed]
    for h in _histories([x for x in serving_export.item_ids if x != target], 5, seed=2):
        assert r.recommend(h, k=3, query="pointer")[0][0] == target
    assert r.recommend([target], k=3, query="pointer")[0][0] != target  # still never a seen item


def test_an_empty_history_with_a_query_is_ranked_by_the_query(rec_pop, onnx_q, table):
    vectors = np.load(onnx_q / "query" / "token_vectors.npy")
    got = rec_pop.recommend([], k=6, query="space robot")
    ids, scores = _ranked_ref(table, WEIGHT * _q_hat(["space", "robot"], vectors), set(), 6)
    assert [i for i, _ in got] == ids
    np.testing.assert_allclose([s for _, s in got], scores, rtol=1e-5, atol=1e-5)
    pop = rec_pop.recommend([], k=6)  # no query: popularity, as before
    assert [i for i, _ in pop] == [table.ids[i] for i in np.argsort(-table.popularity, kind="stable")[:6]]
    # mixed batch: empty + query, empty without, a history with and without a query
    rows = rec_pop.recommend_batch([[], [], ["m101"], ["m101"]], k=6, queries=["space robot", None, "love", None],
                                   explain=True)
    plain = [[(i, s) for i, s, _ in row] for row in rows]
    _assert_rows(plain[0], got)
    assert plain[1] == pop
    assert all(b == [] for _, _, b in rows[0] + rows[1])
    _assert_rows(plain[2], rec_pop.recommend(["m101"], k=6, query="love"))
    _assert_rows(plain[3], rec_pop.recommend(["m101"], k=6))
    assert all([x for x, _ in b] == ["m101"] for _, _, b in rows[2])


def test_query_and_explain_combine(rec, table):
    h = ["m104", "m111", "m122", "m135"]
    got = rec.recommend(h, k=5, query="ocean", explain=True)
    assert [(i, s) for i, s, _ in got] == rec.recommend(h, k=5, query="ocean")
    fed = [table.index[x] for x in h]
    for item, _, because in got:
        want = _explain_ref(table.vectors, table.index[item], fed, 3)
        assert [b for b, _ in because] == [table.ids[r] for r, _ in want]


@pytest.mark.parametrize("query,match", [
    (5, "query must be a string, got int"),
    ("   ", "query is empty"),
    ("a " * 300, "599 characters; the limit is 500"),
    ("zzz qqq", "no word of the query is known to the query encoder"),
    ("!!! ???", "holds no word"),
])
def test_bad_queries_are_request_errors(rec, query, match):
    with pytest.raises(RequestError, match=match):
        rec.recommend(["m101"], query=query)


def test_too_long_query_names_the_limit(rec):
    with pytest.raises(RequestError, match=r"the limit is 500 \(max_query_chars\)"):
        rec.encode_query("x" * 501)


def test_batch_queries_must_match_the_histories(rec):
    with pytest.raises(RequestError, match="queries holds 1 entries for 2 histories"):
        rec.recommend_batch([["m101"], ["m102"]], queries=["space"])
    with pytest.raises(RequestError, match="queries must be a list"):
        rec.recommend_batch([["m101"]], queries="space")
    with pytest.raises(RequestError, match=r"queries\[1\]: query is empty"):
        rec.recommend_batch([["m101"], ["m102"]], queries=["space", ""])


def test_a_query_without_a_query_encoder_says_how_to_build_one(plain_rec, onnx_q):
    assert not plain_rec.has_query_encoder and plain_rec.query_encoder is None
    with pytest.raises(RequestError, match=r"no query encoder.*distillrec query RUN"):
        plain_rec.recommend(["m101"], query="space")
    with pytest.raises(RequestError, match="distillrec query RUN"):
        plain_rec.encode_query("space")
    assert plain_rec.recommend_batch([["m101"]], queries=[None]) == plain_rec.recommend_batch([["m101"]])
    off = Recommender(onnx_q, use_query_encoder=False)
    with pytest.raises(RequestError, match="use_query_encoder=False"):
        off.recommend(["m101"], query="space")


def test_single_graph_mode_refuses_query_and_explain(onnx_q):
    one = Recommender(onnx_q, mode="single")
    assert not one.has_query_encoder
    with pytest.raises(RequestError, match="query needs the two-part export"):
        one.recommend(["m101"], query="space")
    with pytest.raises(RequestError, match="explain needs the two-part export"):
        one.recommend(["m101"], explain=True)
    assert one.recommend(["m101"], k=3, explain=False)


def test_an_item_table_version_mismatch_is_served_and_exposed(serving_export, table, tmp_path):
    d = _copy_export(serving_export, tmp_path / "onnx")
    write_query_folder(d / "query", _token_vectors(table.dim), item_table_version=99)
    r = Recommender(d)
    assert r.query_encoder.item_table_version == 99 and r.table_version != 99
    assert len(r.recommend(["m101"], k=3, query="space")) == 3


# ------------------------------------------------------------------------------------------------ artifact checks
def _corrupt_npy(folder: Path):
    (folder / "token_vectors.npy").write_bytes(b"not a numpy file")


@pytest.mark.parametrize("change,match", [
    (dict(meta={"dim": 33}), r"dim=33 but token_vectors\.npy has 32 columns"),
    (dict(vectors_dim=33, meta={"dim": 33}), r"dim=33 but the item table holds 32-d vectors"),
    (dict(meta={"vocab": 3}), r"vocab=3 but token_vectors\.npy has 10 rows"),
    (dict(meta={"format": "other"}), "format is 'other'"),
    (dict(meta={"version": 2}), "reads version 1"),
    (dict(meta={"weight": 0}), "weight must be a finite number > 0"),
    (dict(meta={"weight": float("nan")}), "weight must be a finite number > 0"),
    (dict(meta={"pooling": "max"}), "pooling must be one of"),
    (dict(meta={"lowercase": "yes"}), "lowercase must be true or false"),
    (dict(meta={"max_query_chars": 0}), "max_query_chars must be a positive int"),
    (dict(drop="tokenizer.json"), r"tokenizer\.json: missing"),
    (dict(drop="meta.json"), r"meta\.json: missing"),
    (dict(drop="token_vectors.npy"), r"token_vectors\.npy: missing"),
    (dict(corrupt=_corrupt_npy), r"token_vectors\.npy: corrupt"),
    (dict(corrupt=lambda f: (f / "meta.json").write_text("{oops")), r"meta\.json: corrupt"),
    (dict(corrupt=lambda f: (f / "tokenizer.json").write_text("{}")), r"tokenizer\.json: corrupt"),
    (dict(dtype=np.float64), "must be a float32"),
])
def test_a_broken_query_folder_is_an_artifact_error(table, tmp_path, change, match):
    vec = _token_vectors(change.get("vectors_dim", table.dim)).astype(change.get("dtype", np.float32))
    folder = write_query_folder(tmp_path / "q", vec, **change.get("meta", {}))
    if "drop" in change:
        (folder / change["drop"]).unlink()
    if "corrupt" in change:
        change["corrupt"](folder)
    with pytest.raises(RuntimeArtifactError, match=match) as e:
        QueryEncoder.load(folder, expected_dim=table.dim)
    assert "distillrec query RUN" in str(e.value)


def test_the_recommender_refuses_a_query_folder_of_another_width(serving_export, table, tmp_path):
    d = _copy_export(serving_export, tmp_path / "onnx")
    write_query_folder(d / "query", _token_vectors(table.dim + 1))
    with pytest.raises(RuntimeArtifactError, match=r"dim=33 but the item table holds 32-d vectors"):
        Recommender(d)


def test_without_tokenizers_the_error_names_the_extra(onnx_q, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "distillrec\[query\]"'):
        Recommender(onnx_q)
    assert not Recommender(onnx_q, use_query_encoder=False).has_query_encoder


def test_the_runtime_imports_tokenizers_only_for_a_query_folder(serving_export):
    import subprocess
    code = ("import sys; from export.runtime import Recommender; "
            f"r = Recommender({str(serving_export.onnx_dir)!r}); r.recommend(['m101'], explain=True); "
            "print('tokenizers' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["False", "False"]


# ------------------------------------------------------------------------------------------------ service
def _http_items(ranked):
    out = []
    for i, s, *rest in ranked:
        item = {"id": i, "score": s}
        if rest:
            item["because"] = [{"id": h, "similarity": sim} for h, sim in rest[0]]
        out.append(item)
    return out


def _assert_items(got, want):
    assert [x["id"] for x in got] == [x["id"] for x in want]
    np.testing.assert_allclose([x["score"] for x in got], [x["score"] for x in want], rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        assert ("because" in g) == ("because" in w)
        if "because" in w:
            assert [b["id"] for b in g["because"]] == [b["id"] for b in w["because"]]
            np.testing.assert_allclose([b["similarity"] for b in g["because"]],
                                       [b["similarity"] for b in w["because"]], atol=1e-6)


@pytest.fixture(scope="module")
def clients(rec):
    from fastapi.testclient import TestClient

    from export.service import create_app
    plain = TestClient(create_app(rec), raise_server_exceptions=False)
    with TestClient(create_app(rec), raise_server_exceptions=False) as batched:
        yield {"plain": plain, "batched": batched}


@pytest.mark.parametrize("which", ["plain", "batched"])
def test_service_recommend_with_query_and_explain_equals_the_runtime(clients, rec, which):
    c = clients[which]
    h = ["m105", "m117", "m103"]
    for body, kw in (({"query": "space war", "explain": True, "k": 5}, dict(query="space war", explain=True, k=5)),
                     ({"query": "love"}, dict(query="love")),
                     ({"explain": True}, dict(explain=True)),
                     ({}, {})):
        r = c.post("/recommend", json={"history": h, **body})
        assert r.status_code == 200, r.text
        _assert_items(r.json()["items"], _http_items(rec.recommend(h, **kw)))
    assert "because" not in c.post("/recommend", json={"history": h}).json()["items"][0]


@pytest.mark.parametrize("which", ["plain", "batched"])
@pytest.mark.parametrize("body,status,match", [
    ({"history": ["m101"], "query": ""}, 400, "query is empty"),
    ({"history": ["m101"], "query": "zzz"}, 400, "no word of the query is known"),
    ({"history": ["m101"], "query": 5}, 422, r"query: Input should be a valid string"),
    ({"history": ["m101"], "explain": "yes"}, 422, r"explain: Input should be a valid boolean"),
])
def test_service_bad_query_or_explain_is_a_4xx_naming_it(clients, which, body, status, match):
    r = clients[which].post("/recommend", json=body)
    assert r.status_code == status, r.text
    assert re.search(match, r.json()["detail"]), r.json()["detail"]


def test_service_query_without_an_encoder_is_a_400(plain_rec):
    from fastapi.testclient import TestClient

    from export.service import create_app
    r = TestClient(create_app(plain_rec)).post("/recommend", json={"history": ["m101"], "query": "space"})
    assert r.status_code == 400 and "distillrec query RUN" in r.json()["detail"]


def test_service_batch_endpoint_with_queries_and_explain(clients, rec):
    c = clients["plain"]
    hs = [["m101", "m102"], ["m110"], ["m120", "m121", "m122"]]
    qs = ["space", None, "ocean night"]
    r = c.post("/recommend/batch", json={"histories": hs, "queries": qs, "explain": True, "k": 4})
    assert r.status_code == 200, r.text
    for got, want in zip(r.json()["results"], rec.recommend_batch(hs, k=4, queries=qs, explain=True)):
        _assert_items(got["items"], _http_items(want))
    bad = c.post("/recommend/batch", json={"histories": hs, "queries": ["space"]})
    assert bad.status_code == 400 and "queries holds 1 entries for 3 histories" in bad.json()["detail"]
    assert c.post("/recommend/batch", json={"histories": hs, "queries": [1, None, None]}).status_code == 422
    meta = c.get("/metadata").json()
    assert meta["query_encoder"]["weight"] == WEIGHT and meta["explain_space"] == "item"


# ------------------------------------------------------------------------------------------------ batching
MIXED = [RecommendJob(history=["m101", "m102"], k=3),
         RecommendJob(history=["m101", "m102"], k=5, query="space"),
         RecommendJob(history=["m110"], k=4, explain=True),
         RecommendJob(history=["m120", "m121"], k=2, query="love robot", explain=True),
         RecommendJob(history=["m130"], k=6, exclude_seen=False, query="night")]


def _alone(rec, j: RecommendJob):
    return rec.recommend(j.history, k=j.k, exclude_seen=j.exclude_seen, query=j.query, explain=j.explain)


def _assert_rows(got, want):
    assert [x[0] for x in got] == [x[0] for x in want]
    np.testing.assert_allclose([x[1] for x in got], [x[1] for x in want], rtol=1e-5, atol=1e-5)
    assert [len(x) for x in got] == [len(x) for x in want]  # explain only where asked
    for g, w in zip(got, want):
        if len(w) == 3:
            assert [b for b, _ in g[2]] == [b for b, _ in w[2]]


def test_recommend_rows_mixes_query_and_explain_rows(rec):
    got = recommend_rows(rec, MIXED)
    for j, row in zip(MIXED, got):
        _assert_rows(row, _alone(rec, j))


class _Gate:
    """The real Recommender, whose first recommend_batch call waits for `release`: the jobs submitted meanwhile
    queue up and the worker answers them as ONE batch (the batch sizes are recorded)."""

    def __init__(self, rec):
        self._rec, self.sizes = rec, []
        self.entered, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._rec, name)

    def recommend_batch(self, histories, **kw):
        self.sizes.append(len(histories))
        if len(self.sizes) == 1:
            self.entered.set()
            assert self.release.wait(30)
        return self._rec.recommend_batch(histories, **kw)


def _gated_batch(rec, jobs: list) -> tuple[list, list]:
    """Submit `jobs` while the worker is held in a first call, so that they form ONE batch; -> (futures, the
    batch sizes of the recommend_batch calls)."""
    gate = _Gate(rec)
    batcher = MicroBatcher(gate, max_batch=16, max_wait_ms=0).start()
    try:
        first = batcher.submit(RecommendJob(history=["m139"], k=2))
        assert gate.entered.wait(30)
        futures = [batcher.submit(j) for j in jobs]
        gate.release.set()
        assert first.result(30) == rec.recommend(["m139"], k=2)
        for f in futures:
            f.exception(30)  # wait for every row (raises only on timeout)
    finally:
        batcher.close()
    return futures, gate.sizes


def _copy_job(j: RecommendJob) -> RecommendJob:
    return RecommendJob(**{f: getattr(j, f) for f in ("history", "k", "exclude_seen", "query", "explain")})


def test_the_micro_batcher_answers_mixed_rows_in_one_batch(rec):
    jobs = [_copy_job(j) for j in MIXED]
    futures, sizes = _gated_batch(rec, jobs)
    assert sizes == [1, len(jobs)]  # the mixed rows went through one call
    for j, f in zip(jobs, futures):
        _assert_rows(f.result(), _alone(rec, j))


def test_a_bad_query_fails_only_its_own_row_of_a_batch(rec):
    jobs = [_copy_job(j) for j in MIXED[:3]] + [RecommendJob(history=["m101"], k=3, query="zzz")]
    futures, sizes = _gated_batch(rec, jobs)
    assert sizes == [1, len(jobs)] + [1] * len(jobs)  # refused as a batch, then answered row by row
    for j, f in zip(jobs[:-1], futures[:-1]):
        _assert_rows(f.result(), _alone(rec, j))
    with pytest.raises(RequestError, match="no word of the query is known"):
        futures[-1].result()


# ------------------------------------------------------------------------------------------------ bench
def test_the_latency_bench_writes_positive_numbers(onnx_q, tmp_path):
    from serve_bench.explain_latency import main
    out = tmp_path / "lat.json"
    assert main([str(onnx_q), "--out", str(out), "--reps", "5", "--users", "3", "--warmup", "1",
                 "--queries", "space war", "love"]) == 0
    rep = json.loads(out.read_text())
    assert set(rep["latency_ms"]) == {"plain", "explain", "query", "encode_query"}
    assert set(rep["ratios"]) == {"explain_over_plain", "query_over_plain"}
    for stats in rep["latency_ms"].values():
        assert stats["samples"] == 5 and all(stats[f"p{p}_ms"] > 0 for p in (50, 90, 99))
    assert all(v > 0 for r in rep["ratios"].values() for v in r.values())
    assert rep["intra_op_threads"] == 1 and rep["queries"] == ["space war", "love"] and rep["history_len"] == 50
