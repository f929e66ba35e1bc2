"""distill.metrics against hand-computed values (every expected number is derived in a comment)."""
import math

import numpy as np
import pytest

from distill.metrics import (auc, bootstrap_ci, bootstrap_weights, evaluate, f1, format_metrics_table, logloss,
                             mae, mean_stat, ranking_metrics, rmse)


def one(metrics):
    """Single-user metric dict -> plain floats."""
    return {k: float(v[0]) for k, v in metrics.items()}


# ----------------------------------------------------------------------------- ranking
def test_known_rank_one_user():
    # target item 2 scores 0.5; items 0 (0.9) and 4 (0.8) score higher -> rank 3
    scores = np.array([[0.9, 0.1, 0.5, 0.3, 0.8, 0.2]])
    m = one(ranking_metrics(scores, [2], ks=(2, 3)))
    assert m["HR@2"] == 0 and m["NDCG@2"] == 0 and m["MRR@2"] == 0
    assert m["HR@3"] == 1
    assert m["NDCG@3"] == pytest.approx(0.5)  # 1/log2(3+1) = 1/2
    assert m["MRR@3"] == pytest.approx(1 / 3)


def test_top_rank_gives_one():
    m = one(ranking_metrics(np.array([[0.1, 3.0, 0.2]]), [1], ks=(1,)))
    assert m == {"HR@1": 1.0, "NDCG@1": 1.0, "MRR@1": 1.0}


def test_tie_straddling_k_is_exact_expectation():
    # 20 items: 8 score 5 (strictly higher), target 9 tied with items 8, 10, 11 (score 3), the rest 1.
    # g = 8, t = 3 -> rank uniform on {9, 10, 11, 12}, each with probability 1/4.
    # HR@10   = P(rank <= 10) = 2/4 = 0.5
    # NDCG@10 = (1/log2(10) + 1/log2(11)) / 4 = (0.3010300 + 0.2890648) / 4 = 0.1475237
    # MRR@10  = (1/9 + 1/10) / 4 = 0.0527778
    # @20: every rank counts -> HR 1, MRR (0.1111111 + 0.1 + 0.0909091 + 0.0833333)/4 = 0.0963384
    scores = np.ones((1, 20))
    scores[0, :8] = 5
    scores[0, 8:12] = 3
    m = one(ranking_metrics(scores, [9], ks=(10, 20)))
    assert m["HR@10"] == pytest.approx(0.5)
    assert m["NDCG@10"] == pytest.approx(0.1475237, abs=1e-7)
    assert m["MRR@10"] == pytest.approx(0.0527778, abs=1e-7)
    assert m["HR@20"] == pytest.approx(1.0)
    assert m["MRR@20"] == pytest.approx(0.0963384, abs=1e-7)
    assert m["NDCG@20"] == pytest.approx(sum(1 / math.log2(r + 1) for r in (9, 10, 11, 12)) / 4)


def test_constant_scorer_is_a_random_ranking():
    # all 100 items tied: rank uniform on 1..100 -> HR@10 = 10/100, MRR@10 = H(10)/100
    m = one(ranking_metrics(np.zeros((1, 100)), [37], ks=(10,)))
    assert m["HR@10"] == pytest.approx(0.1)
    assert m["MRR@10"] == pytest.approx(sum(1 / r for r in range(1, 11)) / 100)


def test_seen_items_are_masked_but_not_the_target():
    scores = np.array([[0.9, 0.5, 0.8, 0.1]])
    # unmasked: items 0 and 2 beat the target 1 -> rank 3
    assert one(ranking_metrics(scores, [1], ks=(10,)))["MRR@10"] == pytest.approx(1 / 3)
    # item 0 seen -> only item 2 is higher -> rank 2; the target is in seen too (re-consumed) and must stay
    m = one(ranking_metrics(scores, [1], seen=[np.array([0, 1])], ks=(1, 10)))
    assert m["HR@1"] == 0
    assert m["MRR@10"] == pytest.approx(1 / 2)
    assert m["NDCG@10"] == pytest.approx(1 / math.log2(3))
    # target alone in seen: nothing changes (rank 3), it is never excluded
    assert one(ranking_metrics(scores, [1], seen=[np.array([1])], ks=(10,)))["MRR@10"] == pytest.approx(1 / 3)


def test_masked_items_do_not_count_as_ties():
    # target 0 ties items 1 and 2; item 1 is seen -> one tie left, rank uniform on {1, 2}: MRR = (1 + 1/2)/2
    m = one(ranking_metrics(np.array([[0.5, 0.5, 0.5, 0.1]]), [0], seen=[np.array([1])], ks=(10,)))
    assert m["MRR@10"] == pytest.approx(0.75)
    assert m["HR@10"] == 1.0


def test_vectorised_matches_random_tie_breaking_monte_carlo():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=(5, 40)).astype(float)  # many ties
    targets = rng.integers(0, 40, size=5)
    seen = [rng.choice(40, size=8, replace=False) for _ in range(5)]
    exact = ranking_metrics(scores, targets, seen=seen, ks=(5,))
    sims = np.zeros((5, 3))
    n_sim = 4000
    for _ in range(n_sim):
        noisy = scores + rng.random(scores.shape) * 1e-3  # random tie-break
        for u in range(5):
            keep = np.ones(40, bool)
            keep[seen[u]] = False
            keep[targets[u]] = True
            rank = 1 + int(((noisy[u] > noisy[u, targets[u]]) & keep).sum())
            if rank <= 5:
                sims[u] += (1, 1 / math.log2(rank + 1), 1 / rank)
    sims /= n_sim
    np.testing.assert_allclose(exact["HR@5"], sims[:, 0], atol=0.03)
    np.testing.assert_allclose(exact["NDCG@5"], sims[:, 1], atol=0.03)
    np.testing.assert_allclose(exact["MRR@5"], sims[:, 2], atol=0.03)


def _reference_ranking(scores, targets, seen, ks):
    """Per user, in plain Python: enumerate the ranks the target can take among its ties (g+1 .. g+t+1, each
    equally likely) and average each metric's gain over them. Independent of ranking_metrics' prefix sums."""
    out = {f"{m}@{k}": [] for k in ks for m in ("HR", "NDCG", "MRR")}
    for row, target, excluded in zip(scores, targets, seen):
        keep = np.ones(len(row), bool)
        keep[excluded] = False
        keep[target] = True
        higher = int(((row > row[target]) & keep).sum())
        ties = int(((row == row[target]) & keep).sum()) - 1
        ranks = range(higher + 1, higher + ties + 2)
        for k in ks:
            out[f"HR@{k}"].append(sum(r <= k for r in ranks) / len(ranks))
            out[f"NDCG@{k}"].append(sum(1 / math.log2(r + 1) for r in ranks if r <= k) / len(ranks))
            out[f"MRR@{k}"].append(sum(1 / r for r in ranks if r <= k) / len(ranks))
    return {name: np.array(v) for name, v in out.items()}


def test_ranking_equals_reference_on_ml100k_shape():
    # 943 users x 1,682 items (ML-100K), integer scores so most targets share their score with ~30 items, and
    # 100 seen items per user (some repeated, some the target itself)
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 60, size=(943, 1682)).astype(np.float64)
    scores[::7] += rng.random((len(scores[::7]), 1682))  # every 7th user without ties
    targets = rng.integers(0, 1682, 943)
    seen = [rng.integers(0, 1682, 100) for _ in range(943)]
    seen[0] = np.append(seen[0], targets[0])  # a re-consumed target stays rankable
    got = ranking_metrics(scores, targets, seen=seen)
    assert set(got) == {"HR@10", "NDCG@10", "MRR@10", "HR@20", "NDCG@20", "MRR@20"}
    ref = _reference_ranking(scores, targets, seen, ks=(10, 20))
    for name, values in got.items():
        assert values.shape == (943,)
        np.testing.assert_allclose(values, ref[name], rtol=1e-12, atol=1e-15, err_msg=name)
    assert 0 < got["HR@10"].mean() < got["HR@20"].mean() < 1  # the inputs exercise hits and misses


def test_nan_scores_raise():
    with pytest.raises(ValueError, match="NaN"):
        ranking_metrics(np.array([[0.1, np.nan]]), [0])


def test_bad_target_or_seen_raise():
    with pytest.raises(ValueError, match="targets"):
        ranking_metrics(np.zeros((1, 3)), [3])
    with pytest.raises(ValueError, match="seen"):
        ranking_metrics(np.zeros((1, 3)), [0], seen=[np.array([5])])


# ----------------------------------------------------------------------------- pointwise
def test_rmse_mae_by_hand():
    # errors -1, 0, 2 -> MSE 5/3, MAE 1
    assert rmse([3, 4, 5], [4, 4, 3]) == pytest.approx(math.sqrt(5 / 3))
    assert mae([3, 4, 5], [4, 4, 3]) == pytest.approx(1.0)


def test_auc_by_hand_with_ties():
    # pos {1, 2}, neg {1, 0}: pairs (1,1) tie = 1/2, (1,0) = 1, (2,1) = 1, (2,0) = 1 -> 3.5/4
    assert auc([1, 1, 2, 0], [1, 0, 1, 0]) == pytest.approx(0.875)
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)


def test_auc_matches_brute_force_pair_count():
    rng = np.random.default_rng(2)
    z = rng.integers(0, 7, 300).astype(float)
    y = rng.random(300) < 0.4
    pos, neg = z[y], z[~y]
    brute = ((pos[:, None] > neg).sum() + 0.5 * (pos[:, None] == neg).sum()) / (len(pos) * len(neg))
    assert auc(z, y) == pytest.approx(brute, abs=1e-12)


def test_auc_needs_two_classes():
    with pytest.raises(ValueError, match="one class"):
        auc([0.1, 0.2], [1, 1])


def test_logloss_matches_formula_and_is_stable():
    z = np.array([-2.0, 0.0, 0.5, 3.0])
    y = np.array([0, 1, 1, 0])
    p = 1 / (1 + np.exp(-z))
    expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert logloss(z, y) == pytest.approx(expected)
    # huge logits: exact limits, no overflow / log(0)
    assert logloss([1000.0], [0]) == pytest.approx(1000.0)
    assert logloss([1000.0], [True]) == pytest.approx(0.0)


def test_f1_by_hand():
    # predicted positive = logit > 0: items 0, 2, 4 (logit 0 is p = 0.5, not above the threshold)
    # TP = {0, 4} = 2, FP = {2} = 1, FN = {1, 5} = 2 -> F1 = 2*2 / (2*2 + 1 + 2) = 4/7
    assert f1([2, -1, 0.5, -3, 1, 0], [1, 1, 0, 0, 1, 1]) == pytest.approx(4 / 7)


def test_labels_must_be_binary():
    with pytest.raises(ValueError, match="0/1"):
        logloss([0.0], [4])


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_weights_are_resamples():
    for w in bootstrap_weights(7, 50, seed=3):
        assert w.shape == (50, 7)
        np.testing.assert_array_equal(w.sum(axis=1), 7)


def test_bootstrap_ci_contains_estimate_is_seeded_and_narrows():
    rng = np.random.default_rng(4)
    small, large = rng.random(50), rng.random(2000)
    lo, hi = bootstrap_ci(mean_stat(small), len(small), seed=0)
    assert lo <= small.mean() <= hi
    assert bootstrap_ci(mean_stat(small), len(small), seed=0) == (lo, hi)
    assert bootstrap_ci(mean_stat(small), len(small), seed=1) != (lo, hi)
    lo2, hi2 = bootstrap_ci(mean_stat(large), len(large), seed=0)
    assert hi2 - lo2 < (hi - lo) / 3  # ~sqrt(40) narrower


def test_auc_and_rmse_cis_recompute_on_each_resample():
    """The CI equals the percentiles of the metric recomputed on explicitly materialised resamples."""
    rng = np.random.default_rng(5)
    n = 60
    z, y = rng.normal(size=n), rng.random(n) < 0.5
    pred, true = rng.normal(3, 1, n), rng.integers(1, 6, n)
    res = evaluate(like_logit=z, like_true=y, rating_pred=pred, rating_true=true, n_boot=200, seed=7)
    aucs, rmses = [], []
    for w in bootstrap_weights(n, 200, seed=7):
        for row in w.astype(int):
            aucs.append(auc(np.repeat(z, row), np.repeat(y, row)))
            rmses.append(rmse(np.repeat(pred, row), np.repeat(true, row)))
    np.testing.assert_allclose(res["like"]["AUC"]["ci"], np.percentile(aucs, [2.5, 97.5]))
    np.testing.assert_allclose(res["rating"]["RMSE"]["ci"], np.percentile(rmses, [2.5, 97.5]))
    assert res["like"]["AUC"]["value"] == pytest.approx(auc(z, y))


def test_like_cis_recompute_on_each_resample_at_ml100k_size():
    """All three like metrics on 943 users (ML-100K's test set): each CI equals the percentiles of the metric
    recomputed on explicitly materialised resamples (AUC with tied logits, F1 at the logit-0 threshold)."""
    rng = np.random.default_rng(6)
    z, y = np.round(rng.normal(size=943), 1), rng.random(943) < 0.55  # rounded: many tied logits
    res = evaluate(like_logit=z, like_true=y, n_boot=100, seed=2)
    per_metric = {"AUC": auc, "F1": f1, "LogLoss": logloss}
    recomputed = {name: [] for name in per_metric}
    for w in bootstrap_weights(943, 100, seed=2):
        for row in w.astype(int):
            for name, fn in per_metric.items():
                recomputed[name].append(fn(np.repeat(z, row), np.repeat(y, row)))
    for name, fn in per_metric.items():
        assert res["like"][name]["value"] == pytest.approx(fn(z, y), abs=1e-12)
        np.testing.assert_allclose(res["like"][name]["ci"], np.percentile(recomputed[name], [2.5, 97.5]),
                                   rtol=1e-10, err_msg=name)


# ----------------------------------------------------------------------------- evaluate / table
def test_evaluate_only_given_tasks_and_structure():
    rng = np.random.default_rng(8)
    scores = rng.normal(size=(30, 12))
    targets = rng.integers(0, 12, 30)
    out = evaluate(next_scores=scores, next_targets=targets, rating_true=np.ones(30), n_boot=50, seed=3)
    assert set(out) == {"next_item", "n_users", "bootstrap"}  # a truth without predictions is ignored
    assert out["n_users"] == 30
    assert out["bootstrap"]["n_boot"] == 50 and out["bootstrap"]["seed"] == 3
    hr = out["next_item"]["HR@10"]
    assert hr["value"] == pytest.approx(ranking_metrics(scores, targets)["HR@10"].mean())
    assert hr["ci"][0] <= hr["value"] <= hr["ci"][1]


def test_evaluate_like_true_bool_or_int_agree():
    z = np.array([0.3, -1.0, 2.0, -0.2, 0.1])
    y = np.array([1, 0, 1, 1, 0])
    a = evaluate(like_logit=z, like_true=y, n_boot=100)
    b = evaluate(like_logit=z, like_true=y.astype(bool), n_boot=100)
    assert a == b
    assert a["like"]["F1"]["value"] == pytest.approx(f1(z, y))
    assert a["like"]["LogLoss"]["value"] == pytest.approx(logloss(z, y))


def test_evaluate_rejects_bad_inputs():
    with pytest.raises(ValueError, match="lengths"):
        evaluate(rating_pred=np.ones(3), rating_true=np.ones(4))
    with pytest.raises(ValueError, match="without the true labels"):
        evaluate(rating_pred=np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        evaluate(rating_pred=np.array([1.0, np.nan]), rating_true=np.ones(2))


def test_format_metrics_table():
    rows = {"teacher": {"next_item": {"NDCG@10": {"value": 0.04123, "ci": [0.0312, 0.0518]}},
                        "n_users": 943},
            "item_mean": {"rating": {"RMSE": {"value": 1.0981, "ci": [1.049, 1.144]}}},
            "no_ci": {"rating": {"RMSE": 1.2}}}
    table = format_metrics_table(rows).splitlines()
    assert table[0] == "| system | next_item/NDCG@10 | rating/RMSE |"
    assert table[1] == "| --- | --- | --- |"
    assert table[2] == "| teacher | 0.0412 [0.031, 0.052] | – |"
    assert table[3] == "| item_mean | – | 1.0981 [1.049, 1.144] |"
    assert table[4] == "| no_ci | – | 1.2000 |"
