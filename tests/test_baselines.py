"""distill.baselines on a hand-checked toy split, plus one plausibility check on the real ML-100K."""
import math

import numpy as np
import pytest

from distill.baselines import baseline_predictions, evaluate_baselines, popularity_scores
from distill.data import Dataset, Split


def toy(with_ratings=True) -> Split:
    """4 users, 5 items (chronological):
    u0 items [0,1,2,3] ratings [5,4,3,1]  train [0,1]  val 2  test 3
    u1 items [1,0,4]   ratings [2,5,4]    train [1]    val 0  test 4
    u2 items [1,2]     ratings [3,5]      train [1,2]  (no eval event: < 3 interactions)
    u3 items [3,1,0,2] ratings [4,4,2,5]  train [3,1]  val 0  test 2
    """
    items = [np.array(s) for s in ([0, 1, 2, 3], [1, 0, 4], [1, 2], [3, 1, 0, 2])]
    ratings = [np.array(r, np.float32) for r in ([5, 4, 3, 1], [2, 5, 4], [3, 5], [4, 4, 2, 5])]
    ds = Dataset(name="toy", user_ids=np.array(["a", "b", "c", "d"]), item_ids=np.array([f"i{i}" for i in range(5)]),
                 item_text=[f"item {i}" for i in range(5)], items=items, ratings=ratings if with_ratings else None,
                 like_threshold=4.0, data_hash="toy", source_file="memory")
    return Split.leave_last_out(ds)


def logit(p):
    return math.log(p / (1 - p))


EVAL = np.array([0, 1, 3])
CLIPPED_ONE = logit(1 - 1e-4)  # like rate 1.0 clipped at 1 - 1e-4 -> 9.2102


def test_popularity_counts_val_only_for_test():
    sp = toy()
    # val: training parts only -> item0: u0; item1: u0,u1,u2,u3; item2: u2; item3: u3; item4: none
    np.testing.assert_array_equal(popularity_scores(sp, "val"), [1, 4, 1, 1, 0])
    # test adds the val events u0->2, u1->0, u3->0 (u2 has none)
    np.testing.assert_array_equal(popularity_scores(sp, "test"), [3, 4, 2, 1, 0])
    rows = baseline_predictions(sp, "test", EVAL)["popularity"]["next_scores"]
    assert rows.shape == (3, 5)
    np.testing.assert_array_equal(rows[2], [3, 4, 2, 1, 0])


def test_rating_means_val():
    preds = baseline_predictions(toy(), "val", EVAL)
    # training ratings: 5,4 | 2 | 3,5 | 4,4 -> 27/7; likes (>= 4): 5 of 7
    np.testing.assert_allclose(preds["global_mean"]["rating_pred"], [27 / 7] * 3)
    np.testing.assert_allclose(preds["global_mean"]["like_logit"], [logit(5 / 7)] * 3)
    # user history before the val target: u0 [5,4] -> 4.5, u1 [2] -> 2, u3 [4,4] -> 4
    np.testing.assert_allclose(preds["user_mean"]["rating_pred"], [4.5, 2, 4])
    np.testing.assert_allclose(preds["user_mean"]["like_logit"], [CLIPPED_ONE, logit(1e-4), CLIPPED_ONE])
    # val targets: u0 -> item 2 (rated 5 by u2), u1 and u3 -> item 0 (rated 5 by u0)
    np.testing.assert_allclose(preds["item_mean"]["rating_pred"], [5, 5, 5])
    assert preds["popularity"]["rating_pred"] is None and preds["global_mean"]["next_scores"] is None


def test_rating_means_test_include_val_and_fall_back_to_global():
    preds = baseline_predictions(toy(), "test", EVAL)
    # + val ratings 3 (u0), 5 (u1), 2 (u3) -> 37/10 = 3.7; likes 6 of 10
    np.testing.assert_allclose(preds["global_mean"]["rating_pred"], [3.7] * 3)
    # u0 [5,4,3] -> 4, u1 [2,5] -> 3.5, u3 [4,4,2] -> 10/3
    np.testing.assert_allclose(preds["user_mean"]["rating_pred"], [4, 3.5, 10 / 3])
    np.testing.assert_allclose(preds["user_mean"]["like_logit"], [logit(2 / 3), 0.0, logit(2 / 3)])
    # test targets: u0 -> item 3 (u3: 4), u1 -> item 4 (never rated before -> global 3.7), u3 -> item 2 (5, 3)
    np.testing.assert_allclose(preds["item_mean"]["rating_pred"], [4, 3.7, 4])
    np.testing.assert_allclose(preds["item_mean"]["like_logit"], [CLIPPED_ONE, logit(0.6), 0.0])


def test_evaluate_baselines_popularity_by_hand():
    res = evaluate_baselines(toy(), "test", EVAL, n_boot=50)
    assert set(res) == {"popularity", "global_mean", "user_mean", "item_mean"}
    # test scores [3,4,2,1,0]; seen items are masked:
    # u0 target 3, seen {0,1,2} -> left {3,4} -> rank 1
    # u1 target 4, seen {1,0}   -> left {2,3,4} -> rank 3
    # u3 target 2, seen {3,1,0} -> left {2,4} -> rank 1   => MRR@10 = (1 + 1/3 + 1)/3 = 7/9
    assert res["popularity"]["next_item"]["MRR@10"]["value"] == pytest.approx(7 / 9)
    assert "rating" not in res["popularity"] and "next_item" not in res["global_mean"]
    # global mean: errors 3.7 - [1, 4, 5] = 2.7, -0.3, -1.3 -> RMSE sqrt((7.29 + 0.09 + 1.69)/3)
    assert res["global_mean"]["rating"]["RMSE"]["value"] == pytest.approx(math.sqrt(9.07 / 3))
    assert res["global_mean"]["n_users"] == 3


def test_without_ratings_only_popularity():
    sp = toy(with_ratings=False)
    assert set(baseline_predictions(sp, "val", EVAL)) == {"popularity"}
    res = evaluate_baselines(sp, "val", EVAL, n_boot=20)
    assert set(res) == {"popularity"} and set(res["popularity"]) == {"next_item", "n_users", "bootstrap"}


def test_users_without_eval_event_rejected():
    with pytest.raises(ValueError, match="no val event"):
        baseline_predictions(toy(), "val", [2])
    with pytest.raises(ValueError, match="stage"):
        baseline_predictions(toy(), "train", EVAL)


def test_ml100k_baselines_plausible(ml100k_split):
    res = evaluate_baselines(ml100k_split, "test", ml100k_split.eval_users, n_boot=100)
    assert 0.01 < res["popularity"]["next_item"]["NDCG@10"]["value"] < 0.1
    assert 1.0 < res["global_mean"]["rating"]["RMSE"]["value"] < 1.3
    assert res["item_mean"]["rating"]["RMSE"]["value"] < res["global_mean"]["rating"]["RMSE"]["value"]
    assert res["global_mean"]["n_users"] == 943
