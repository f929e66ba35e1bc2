"""The query encoder builder (export/query_build.py) with the tiny random teacher LM and the tiny exported student:
the streamed PMI projection equals the dense computation, the ridge fit recovers planted token vectors, left
padding changes no next-token distribution, and a built artifact serves through the runtime; plus the
interactive study's pieces (distillrec/interactive.py) that do not need the real teacher."""
import json
import shutil

import numpy as np
import pytest
import torch

from distill.config import TeacherConfig
from distill.teacher import load_causal_lm
from export.query_build import (QueryBuildConfig, build_query_encoder, next_token_logprobs, pmi_projection,
                                ridge_token_vectors, set_weight)

TEMPLATES = ("The movie {text} is a", "Q: what is {text}? A: a")


@pytest.fixture(scope="module")
def tiny_lm():
    tc = TeacherConfig(model="tiny-random")
    return load_causal_lm(TeacherConfig(model="tiny-random", tiny={**tc.tiny, "initializer_range": 0.2}), seed=0)


def _texts(n: int) -> list[str]:
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa"]
    return [" ".join(rng.choice(words, size=rng.integers(1, 4))) + f" ({1990 + i})" for i in range(n)]


def test_left_padding_changes_no_next_token_distribution(tiny_lm):
    lm, tok = tiny_lm
    prompts = ["a", "a much longer prompt here", "mid size"]
    batched = next_token_logprobs(lm, tok, prompts)
    for row, p in enumerate(prompts):
        alone = next_token_logprobs(lm, tok, [p])[0]
        np.testing.assert_allclose(batched[row], alone, atol=1e-5)
    np.testing.assert_allclose(np.exp(batched).sum(1), 1.0, atol=1e-6)


def test_streamed_pmi_projection_equals_the_dense_matrix(tiny_lm):
    lm, tok = tiny_lm
    texts = _texts(11)
    V = np.random.default_rng(0).normal(size=(11, 5)).astype(np.float32)
    keep = (3, 70, 101)
    cfg = QueryBuildConfig(templates=TEMPLATES, batch_items=4, keep_tokens=keep)  # 3 batches per template
    fit = pmi_projection(lm, tok, texts, V, cfg, progress=False)
    dense = []
    for t in TEMPLATES:
        L = next_token_logprobs(lm, tok, [t.format(text=x, domain="movie") for x in texts])
        dense.append(L - np.log(np.exp(L).mean(0, keepdims=True)))  # log p - log mean_j p
    pmi = np.mean(dense, 0)
    # float32 forwards of other batch compositions differ by ~1e-6; a wrong centring would differ by O(1)
    np.testing.assert_allclose(fit.vt_pmi, V.astype(np.float64).T @ pmi, atol=1e-4)
    np.testing.assert_allclose(fit.kept, pmi[:, list(keep)], atol=1e-4)
    assert fit.lm_tokens > 0 and fit.seconds > 0


def test_ridge_recovers_planted_token_vectors():
    rng = np.random.default_rng(0)
    V = rng.normal(size=(200, 8))
    E = rng.normal(size=(50, 8))
    got = ridge_token_vectors(V, V.T @ (V @ E.T), ridge=1e-9)
    np.testing.assert_allclose(got, E, atol=1e-4)
    shrunk = ridge_token_vectors(V, V.T @ (V @ E.T), ridge=10.0)
    assert np.linalg.norm(shrunk) < np.linalg.norm(got)  # the ridge really shrinks


@pytest.mark.parametrize("bad", [dict(templates=("no placeholder",)), dict(ridge=0.0), dict(batch_items=0),
                                 dict(weight=float("nan"))])
def test_build_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        QueryBuildConfig(**bad)


def test_built_artifact_serves_queries_through_the_runtime(tiny_lm, serving_export, tmp_path):
    from export.item_table import load_table
    from export.runtime import Recommender
    lm, tok = tiny_lm
    onnx = tmp_path / "onnx"
    shutil.copytree(serving_export.onnx_dir, onnx)
    table = load_table(onnx / "items")
    V = np.asarray(table.vectors, dtype=np.float32)
    texts = _texts(len(V))
    cfg = QueryBuildConfig(templates=TEMPLATES[:1], batch_items=16, weight=2.5)
    folder, fit = build_query_encoder(lm, tok, texts, V, onnx / "query", table.version, "tiny test LM", cfg,
                                      progress=False)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["weight"] == 2.5 and meta["item_table_version"] == table.version and meta["dim"] == V.shape[1]
    assert meta["build"]["items"] == len(V)
    tv = np.load(folder / "token_vectors.npy")
    np.testing.assert_allclose(tv, ridge_token_vectors(V, fit.vt_pmi, cfg.ridge), atol=1e-6)
    rec = Recommender(onnx)
    assert rec.has_query_encoder and rec.query_encoder.weight == 2.5
    q = rec.encode_query("Alpha omega")
    first = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("alpha", "omega")]
    ref = tv[first].sum(0)
    np.testing.assert_allclose(q, ref / np.linalg.norm(ref), atol=1e-6)
    hist = serving_export.item_ids[:3]
    steered = rec.recommend(hist, k=5, query="alpha omega")
    assert len(steered) == 5 and not set(i for i, _ in steered) & set(hist)
    set_weight(folder, 7.0, extra=dict(weight_chosen_on="test"))
    assert Recommender(onnx).query_encoder.weight == 7.0
    with pytest.raises(ValueError, match="weight"):
        set_weight(folder, -1.0)


def test_build_refuses_texts_and_vectors_of_different_items(tiny_lm, tmp_path):
    lm, tok = tiny_lm
    with pytest.raises(ValueError, match="same items"):
        build_query_encoder(lm, tok, _texts(3), np.zeros((4, 2), np.float32), tmp_path / "q", 1, "x",
                            progress=False)


# ----------------------------------------------------------------------------- the study's pieces
class _Ev:
    def __init__(self, genres, targets, seen):
        self.genres, self.targets, self.seen = genres, np.asarray(targets), seen

    def __len__(self):
        return len(self.genres)


def test_genre_query_and_genre_popularity_baseline():
    from distillrec.interactive import genre_popularity_scores, genre_query
    assert genre_query(["Action", "Sci-Fi", "Children's"]) == "action science fiction children's"
    labels = [["Action"], ["Action", "Sci-Fi"], ["Drama"], ["Action", "Sci-Fi"], []]
    pop = np.array([100.0, 1.0, 500.0, 3.0, 9.0])
    s = genre_popularity_scores(_Ev([["Action", "Sci-Fi"]], [1], [np.array([], int)]), labels, pop)
    assert list(np.argsort(-s[0])) == [3, 1, 0, 2, 4]  # both genres (by popularity), one genre, none (by pop.)


def test_choose_weight_picks_the_validation_best():
    from distillrec.interactive import WEIGHT_GRID, choose_weight
    rng = np.random.default_rng(0)
    n, e = 30, 40
    base = rng.normal(size=(e, n))
    targets = rng.integers(0, n, size=e)
    direction = np.zeros((e, n))
    direction[np.arange(e), targets] = 1.0  # the query points exactly at the target: more weight is better
    w, curve = choose_weight(base, direction, _Ev([["x"]] * e, targets, [np.array([], int)] * e))
    assert len(curve) == len(WEIGHT_GRID) and curve[w] == max(curve.values()) == 1.0
    assert w == min(k for k, v in curve.items() if v == 1.0)  # ties go to the smallest weight


def test_compare_combinations_measures_shift_and_filter_then_rank():
    from distillrec.interactive import FILTER_SIZES, compare_combinations
    rng = np.random.default_rng(0)
    e, n = 20, 300
    targets = rng.integers(0, n, size=e)
    base = rng.normal(size=(e, n))
    for r, t in enumerate(targets):  # good, but 15 other items score higher in each row
        base[r, rng.choice(np.setdiff1d(np.arange(n), [t]), size=15, replace=False)] = 5.0
        base[r, t] = 4.0
    direction = np.zeros((e, n))
    for r, t in enumerate(targets):  # the query keeps the target and 49 low-scoring items
        low = np.argsort(base[r])[:49]
        direction[r, low] = 1.0
        direction[r, t] = 1.0
    ev = _Ev([["x"]] * e, targets, [np.array([], int)] * e)
    out = compare_combinations(base, direction, weight=1e-6, ev=ev)
    assert out["filter50"] == 1.0  # inside the 50 query items the target is the best by the user score
    assert out["shift"] == 0.0  # a negligible shift leaves the 15 higher items in front
    assert out["best"] in ("filter50", "filter50+shift")
    assert {f"filter{m}" for m in FILTER_SIZES if m < n} <= set(out)
