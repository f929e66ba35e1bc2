"""Distillation losses with hand-checkable values: KL = 0 on matching distributions, the T^2 convention,
ListMLE prefers the teacher's order, soft-label BCE / MSE, alignment gradients, and the hard/KD mixing."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from distill.config import StudentConfig
from distill.losses import (DistillationObjective, LikeBCE, ListwiseRankingLoss, NextItemKL, RatingMSE,
                            RepresentationAlignment, teacher_catalog_logits)
from distill.weighting import build_weighting

TASKS = ["next_item", "rating", "like"]


# ----------------------------------------------------------------------------- NextItemKL
def test_kl_is_zero_when_tempered_distributions_match():
    t = torch.tensor([[3.0, 1.0, -2.0, 0.5]])
    for T in (1.0, 2.0, 5.0):
        kl = NextItemKL(T)
        assert kl(t.clone(), t).item() == pytest.approx(0.0, abs=1e-6)
        assert kl(t + 7.0, t).item() == pytest.approx(0.0, abs=1e-6)  # softmax is shift-invariant


def test_kl_hand_value_and_t_squared_factor():
    # teacher uniform over 2 items, student logits (log 3, 0): at T = 1, p_s = (3/4, 1/4)
    s, t = torch.tensor([[math.log(3.0), 0.0]]), torch.zeros(1, 2)
    expected_t1 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # = 0.5 * log(4/3)
    assert NextItemKL(1.0)(s, t).item() == pytest.approx(expected_t1, rel=1e-5)
    # at T = 2: p_s = softmax(log(3)/2, 0) = (sqrt3, 1) / (1 + sqrt3); the loss is T^2 * KL
    q = math.sqrt(3) / (1 + math.sqrt(3))
    kl_t2 = 0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (1 - q))
    assert NextItemKL(2.0)(s, t).item() == pytest.approx(4.0 * kl_t2, rel=1e-5)


def test_t_squared_keeps_the_gradient_scale_when_t_grows():
    torch.manual_seed(0)
    t = torch.randn(8, 20)
    grads = {}
    for T in (5.0, 10.0):
        s = torch.randn(8, 20, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        NextItemKL(T)(s, t).sum().backward()
        grads[T] = s.grad.norm().item()
    # grad = T * (p_s - p_t) ~ (s - t) / N for large T: about the same at T = 5 and 10 (1/4 without T^2)
    assert grads[10.0] / grads[5.0] == pytest.approx(1.0, abs=0.1)


def test_kl_mask_drops_entries_and_they_get_no_gradient():
    s = torch.tensor([[1.0, 2.0, 0.0, -1.0]], requires_grad=True)
    t = torch.tensor([[0.5, 1.5, 3.0, 0.0]])
    valid = torch.tensor([[True, True, False, True]])
    loss = NextItemKL(2.0)(s, t, valid)
    keep = [0, 1, 3]
    ref = NextItemKL(2.0)(s.detach()[:, keep], t[:, keep])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.sum().backward()
    assert s.grad[0, 2].item() == 0.0 and s.grad[0, keep].abs().sum() > 0
    empty = NextItemKL(2.0)(s.detach(), t, torch.zeros_like(valid))
    assert empty.item() == 0.0


def test_kl_gradient_never_reaches_the_teacher():
    s, t = torch.randn(2, 5, requires_grad=True), torch.randn(2, 5, requires_grad=True)
    NextItemKL(2.0)(s, t).sum().backward()
    assert t.grad is None and s.grad is not None


def test_catalog_logits_rebuild_the_teachers_scores():
    torch.manual_seed(0)
    uv, table, bias = torch.randn(3, 4).half(), torch.randn(6, 4), torch.randn(6)
    got = teacher_catalog_logits(uv, table, bias)
    assert got.shape == (3, 6) and got.dtype == torch.float32
    assert torch.allclose(got, uv.float() @ table.T + bias)
    assert NextItemKL(3.0)(got.clone(), got).abs().max().item() < 1e-6


# ----------------------------------------------------------------------------- ListMLE
def test_listwise_is_lower_for_the_teachers_order():
    lw = ListwiseRankingLoss(top_k=4)
    right = torch.tensor([[4.0, 3.0, 2.0, 1.0]])  # student scores in the teacher's order, best first
    wrong = right.flip(-1)
    assert lw(right).item() < lw(wrong).item()


def test_listwise_hand_value_for_two_items():
    # (1/2) * [(log(e^2 + e^0) - 2) + (0 - 0)] = 0.5 * log(1 + e^-2)
    got = ListwiseRankingLoss(top_k=2)(torch.tensor([[2.0, 0.0]]))
    assert got.item() == pytest.approx(0.5 * math.log(1 + math.exp(-2.0)), rel=1e-6)


def test_listwise_uses_only_the_first_k_and_skips_invalid_items():
    lw = ListwiseRankingLoss(top_k=3)
    s = torch.tensor([[3.0, 9.0, 1.0, 100.0]])
    full = lw(s)
    assert full.item() == pytest.approx(ListwiseRankingLoss(top_k=3)(s[:, :3]).item())
    valid = torch.tensor([[True, False, True, True]])
    assert lw(s, valid).item() == pytest.approx(ListwiseRankingLoss(top_k=2)(torch.tensor([[3.0, 1.0]])).item(),
                                                rel=1e-6)


def test_listwise_rejects_a_list_of_one():
    with pytest.raises(ValueError, match="listwise_top_k"):
        ListwiseRankingLoss(top_k=1)


# ----------------------------------------------------------------------------- like / rating
def test_like_bce_is_minimal_at_the_teachers_logit_with_value_its_entropy():
    t = torch.tensor([0.8, -1.2])
    s = t.clone().requires_grad_(True)
    loss = LikeBCE()(s, t)
    p = torch.sigmoid(t)
    assert torch.allclose(loss, -(p * p.log() + (1 - p) * (1 - p).log()), atol=1e-6)
    loss.sum().backward()
    assert s.grad.abs().max().item() < 1e-6
    assert (LikeBCE()(t + 1.0, t) > loss.detach()).all()


def test_rating_mse_hand_value():
    assert RatingMSE()(torch.tensor([3.0, 4.5]), torch.tensor([4.0, 4.0])).tolist() == [1.0, 0.25]


# ----------------------------------------------------------------------------- alignment
@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_alignment_gradient_reaches_only_student_and_projector(kind):
    torch.manual_seed(0)
    al = RepresentationAlignment(6, 10, kind)
    state = torch.randn(4, 6, requires_grad=True)
    teacher = torch.randn(4, 10, requires_grad=True)
    loss = al(state, teacher)
    assert loss.shape == (4,)
    loss.mean().backward()
    assert teacher.grad is None
    assert state.grad is not None and state.grad.abs().sum() > 0
    assert al.proj.weight.grad is not None and al.proj.weight.grad.abs().sum() > 0


def test_alignment_values():
    al = RepresentationAlignment(3, 3, "cosine")
    with torch.no_grad():
        al.proj.weight.copy_(torch.eye(3))
        al.proj.bias.zero_()
    s = torch.tensor([[1.0, 2.0, 3.0]])
    assert al(s, 5 * s).item() == pytest.approx(0.0, abs=1e-6)  # cosine ignores scale
    assert al(s, -s).item() == pytest.approx(2.0, abs=1e-6)
    al.kind = "mse"
    assert al(s, s + torch.tensor([[1.0, 0.0, 2.0]])).item() == pytest.approx(5.0 / 3.0)
    with pytest.raises(ValueError, match="align_loss"):
        RepresentationAlignment(3, 3, "l1")


# ----------------------------------------------------------------------------- the objective
N, K, B, L, DT, DS = 12, 5, 2, 4, 6, 8


def _batch(seed=0, has_teacher=None):
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(0, N, (B, L), generator=g)
    ratings = torch.randint(1, 6, (B, L), generator=g).float()
    labelled = torch.ones(B, L, dtype=torch.bool)
    labelled[0, 0] = False
    ht = torch.ones(B, L, dtype=torch.bool) if has_teacher is None else has_teacher
    t_items = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B * L)]).view(B, L, K)
    t_logits = torch.sort(torch.randn(B, L, K, generator=g), dim=-1, descending=True).values
    return dict(items=items, ratings=ratings, labelled=labelled, has_teacher=ht, t_items=t_items, t_logits=t_logits,
                t_rating=torch.rand(B, L, generator=g) * 4 + 1, t_like=torch.randn(B, L, generator=g),
                t_user=torch.randn(B, L, DT, generator=g))


def _out(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"next_item": torch.randn(B, L, N, generator=g, requires_grad=True),
            "rating": (torch.rand(B, L, 1, generator=g) * 4 + 1).requires_grad_(True),
            "like": torch.randn(B, L, 1, generator=g, requires_grad=True),
            "state": torch.randn(B, L, DS, generator=g, requires_grad=True)}


def _sel(out, batch):
    """What training passes: the outputs at the labelled positions only (forward_positions(select=...))."""
    return {k: v[batch["labelled"]] for k, v in out.items()}


def _objective(scope="topk", exclude=None, **kw):
    cfg = replace(StudentConfig(), kd_scope=scope, **kw)
    g = torch.Generator().manual_seed(5)
    return DistillationObjective(cfg, TASKS, DS, teacher_dim=DT, item_table=torch.randn(N, DT, generator=g),
                                 item_bias=torch.randn(N, generator=g), exclude_items=exclude)


def _hard(out, batch):
    m = batch["labelled"]
    r = batch["ratings"][m]
    return {"next_item": F.cross_entropy(out["next_item"][m], batch["items"][m], reduction="none"),
            "rating": (out["rating"][..., 0][m] - r) ** 2,
            "like": F.binary_cross_entropy_with_logits(out["like"][..., 0][m], (r >= 4).float(), reduction="none")}


def test_mixing_formula_per_position():
    ht = torch.tensor([[True, False, True, True], [False, True, False, True]])
    batch, out = _batch(has_teacher=ht), _out()
    obj = _objective(kd_alpha=0.3, kd_next_item=1.0, kd_listwise=0.0, kd_rating=2.0, kd_like=1.0, kd_align=0.0)
    losses, align, logged = obj(_sel(out, batch), batch)
    assert align is None
    hard = _hard(out, batch)
    m = batch["labelled"]
    h = ht[m]
    r_kd = (out["rating"][..., 0][m] - batch["t_rating"][m]) ** 2
    expected = torch.where(h, 0.7 * hard["rating"] + 0.3 * 2.0 * r_kd, hard["rating"]).mean()
    assert losses["rating"].item() == pytest.approx(expected.item(), rel=1e-5)
    # logged values are unweighted: the MSE itself over the teacher positions, not 2x it
    assert logged["rating/kd"] == pytest.approx(r_kd[h].mean().item(), rel=1e-5)
    assert logged["rating/hard"] == pytest.approx(hard["rating"].mean().item(), rel=1e-5)
    s = torch.gather(out["next_item"][m][h], -1, batch["t_items"][m][h])
    kl = NextItemKL(2.0)(s, batch["t_logits"][m][h])
    nxt = hard["next_item"].clone()
    nxt[h] = 0.7 * nxt[h] + 0.3 * kl
    assert losses["next_item"].item() == pytest.approx(nxt.mean().item(), rel=1e-5)


def test_alpha_zero_or_no_teacher_is_the_hard_objective():
    batch, out = _batch(), _out()
    hard = {t: v.mean().item() for t, v in _hard(out, batch).items()}
    for obj in (_objective(kd_alpha=0.0, kd_align=0.0),
                DistillationObjective(StudentConfig(), TASKS, DS, use_teacher=False)):
        losses, align, logged = obj(_sel(out, batch), batch)
        assert align is None
        assert {t: v.item() for t, v in losses.items()} == pytest.approx(hard, rel=1e-6)
        assert set(logged) == {"next_item/hard", "rating/hard", "like/hard"}


def test_components_switch_off_one_by_one():
    batch, out = _batch(), _out()
    names = {"kd_next_item": "next_item/kl", "kd_listwise": "next_item/listwise", "kd_rating": "rating/kd",
             "kd_like": "like/kd", "kd_align": "align"}
    full = _objective()(_sel(out, batch), batch)[2]
    assert set(names.values()) <= set(full)
    for field, name in names.items():
        logged = _objective(**{field: 0.0})(_sel(out, batch), batch)[2]
        assert name not in logged
        assert set(names.values()) - {name} <= set(logged)


def test_alignment_is_weighted_outside_the_tasks_and_uses_teacher_positions():
    ht = torch.tensor([[False, False, True, True], [False, True, False, False]])
    batch, out = _batch(has_teacher=ht), _out()
    obj = _objective(kd_align=0.25, align_loss="mse")
    _, align, logged = obj(_sel(out, batch), batch)
    pos = batch["labelled"] & ht
    raw = ((obj.align.proj(out["state"][pos]) - batch["t_user"][pos]) ** 2).mean(-1).mean()
    assert logged["align"] == pytest.approx(raw.item(), rel=1e-5)
    assert align.item() == pytest.approx(0.25 * raw.item(), rel=1e-5)


def test_catalog_scope_uses_the_rebuilt_teacher_logits():
    batch, out = _batch(), _out()
    obj = _objective(scope="catalog", kd_listwise=0.0)
    assert obj.scope == "catalog" and _objective(scope="auto").scope == "catalog"
    logged = obj(_sel(out, batch), batch)[2]
    m = batch["labelled"]
    t_logits = teacher_catalog_logits(batch["t_user"][m], obj.t_item_table, obj.t_item_bias)
    assert logged["next_item/kl"] == pytest.approx(NextItemKL(2.0)(out["next_item"][m], t_logits).mean().item(),
                                                   rel=1e-5)
    no_uv = DistillationObjective(replace(StudentConfig(), kd_scope="auto"), TASKS, DS)
    assert no_uv.scope == "topk"
    with pytest.raises(ValueError, match="catalog"):
        DistillationObjective(replace(StudentConfig(), kd_scope="catalog"), TASKS, DS)


@pytest.mark.parametrize("scope", ["topk", "catalog"])
def test_excluded_items_get_no_gradient_from_any_loss(scope):
    batch, out = _batch(), _out()
    exclude = torch.zeros(N, dtype=torch.bool)
    cold = [int(batch["t_items"][0, 1, 0]), int(batch["t_items"][1, 2, 1])]  # cold items inside teacher lists
    exclude[cold] = True
    keep = ~torch.isin(batch["items"], torch.tensor(cold))
    batch["labelled"] &= keep  # their events are dropped from training data
    obj = _objective(scope=scope, exclude=exclude)
    losses, align, _ = obj(_sel(out, batch), batch)
    total, _ = build_weighting("fixed", TASKS, {"next_item": 1.0, "rating": 0.5, "like": 0.5})(losses)
    (total + align).backward()
    g = out["next_item"].grad
    assert g[..., cold].abs().max().item() == 0.0
    assert g[..., ~exclude].abs().sum().item() > 0


def test_objective_rejects_unselected_outputs():
    batch, out = _batch(), _out()
    with pytest.raises(ValueError, match="select"):
        _objective()(out, batch)


def test_objective_feeds_every_weighting_strategy():
    batch, out = _batch(), _out()
    for name in ("fixed", "uncertainty", "dwa"):
        losses, align, _ = _objective()(_sel(out, batch), batch)
        total, weights = build_weighting(name, TASKS, {"next_item": 1.0, "rating": 0.5, "like": 0.5})(losses)
        assert torch.isfinite(total) and set(weights) == set(TASKS)
