"""Loss-weighting strategies behind one interface (shared by teacher and student)."""
import math

import pytest
import torch

from distill.weighting import DynamicWeightAverage, FixedWeighting, GradNorm, UncertaintyWeighting, build_weighting

TASKS = ["next_item", "rating", "like"]


def _losses(a=2.0, b=1.0, c=0.5):
    return {"next_item": torch.tensor(a), "rating": torch.tensor(b), "like": torch.tensor(c)}


def test_fixed_is_the_weighted_sum():
    total, w = FixedWeighting(TASKS, {"next_item": 1.0, "rating": 0.5})(_losses())
    assert float(total) == pytest.approx(2.0 + 0.5 * 1.0 + 1.0 * 0.5)
    assert w == {"next_item": 1.0, "rating": 0.5, "like": 1.0}


def test_uncertainty_formula_and_learns_to_downweight_the_large_loss():
    uw = UncertaintyWeighting(TASKS)
    with torch.no_grad():
        uw.log_var["rating"].fill_(math.log(2.0))
    total, w = uw(_losses())
    assert total.item() == pytest.approx(2.0 + 1.0 / 2 + math.log(2.0) + 0.5)
    assert w["rating"] == pytest.approx(0.5)
    opt = torch.optim.SGD(uw.parameters(), lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        uw({"next_item": torch.tensor(8.0), "rating": torch.tensor(0.1)})[0].backward()
        opt.step()
    # optimum of exp(-s) L + s is s = log L: weight 1/L
    assert float(uw.log_var["next_item"]) == pytest.approx(math.log(8.0), abs=0.05)
    assert float(uw.log_var["rating"]) == pytest.approx(math.log(0.1), abs=0.05)


def test_dwa_weights_follow_the_loss_trend():
    dwa = DynamicWeightAverage(TASKS, temperature=2.0)
    dwa.end_epoch({"next_item": 4.0, "rating": 1.0, "like": 1.0})
    assert dwa(_losses())[1] == {t: 1.0 for t in TASKS}  # needs two epochs of history
    dwa.end_epoch({"next_item": 4.0, "rating": 0.5, "like": 1.0})  # rating fell fastest
    w = dwa(_losses())[1]
    r = {"next_item": 1.0, "rating": 0.5, "like": 1.0}
    z = sum(math.exp(v / 2.0) for v in r.values())
    for t in TASKS:
        assert w[t] == pytest.approx(3 * math.exp(r[t] / 2.0) / z)
    assert w["rating"] < w["like"] == w["next_item"]
    assert sum(w.values()) == pytest.approx(3.0)


def test_dwa_state_survives_a_checkpoint_round_trip():
    """A resumed teacher must re-weight exactly as an uninterrupted one: DWA's loss history is in state_dict."""
    dwa = DynamicWeightAverage(TASKS)
    dwa.end_epoch({"next_item": 4.0, "rating": 1.0, "like": 1.0})
    dwa.end_epoch({"next_item": 3.0, "rating": 1.0, "like": 0.5})
    fresh = DynamicWeightAverage(TASKS)
    fresh.load_state_dict(dwa.state_dict())
    assert fresh(_losses())[1] == dwa(_losses())[1] != {t: 1.0 for t in TASKS}
    for w in (dwa, fresh):  # and both go on identically
        w.end_epoch({"next_item": 2.0, "rating": 0.9, "like": 0.5})
    assert fresh(_losses())[1] == dwa(_losses())[1]


def test_gradnorm_equalises_gradient_norms_and_keeps_the_sum():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(4))
    gn = GradNorm(["a", "b"], shared=[W], alpha=0.0, lr=0.002)
    gn.train()
    for _ in range(1500):
        # task a's gradient on W is 10x task b's
        losses = {"a": 10.0 * (W ** 2).sum() / 2 + 1.0, "b": (W ** 2).sum() / 2 + 1.0}
        total, w = gn(losses)
        W.grad = None
        total.backward()
    assert w["a"] + w["b"] == pytest.approx(2.0, abs=1e-5)
    assert w["a"] * 10 == pytest.approx(w["b"], rel=0.1)  # alpha=0: equal weighted gradient norms
    assert W.grad is not None and torch.isfinite(W.grad).all()


def test_gradnorm_needs_the_shared_layer_and_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="shared"):
        build_weighting("gradnorm", TASKS)
    with pytest.raises(ValueError, match="unknown loss weighting"):
        build_weighting("magic", TASKS)
