"""Distillation losses with hand-checkable values: KL = 0 on matching distributions, the T^2 convention,
ListMLE prefers the teacher's order, the DLLM2Rec ranking distillation's weights and value, soft-label
BCE / MSE, alignment gradients, and the hard/KD mixing."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from distill.config import StudentConfig
from distill.losses import (DistillationObjective, LikeBCE, ListwiseRankingLoss, NextItemKL, RankingDistillation,
                            RatingMSE, RepresentationAlignment, teacher_catalog_logits)
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


# ----------------------------------------------------------------------------- ranking distillation (DLLM2Rec)
def _norm(xs):
    return [x / sum(xs) for x in xs]


# row 0: student top-3 = items {1, 3, 4}; teacher list (3, 0, 1) with probabilities 0.6 / 0.3 / 0.1
# row 1: student top-3 = items {1, 3, 0}; teacher list (2, 4, 0), the last one invalid (excluded)
RK_S = torch.tensor([[0.5, 3.0, -1.0, 2.0, 1.0], [-1.0, 5.0, -2.0, 4.0, -3.0]])
RK_ITEMS = torch.tensor([[3, 0, 1], [2, 4, 0]])
RK_T = torch.tensor([[math.log(6.0), math.log(3.0), 0.0], [0.0, math.log(3.0), 7.0]])
RK_VALID = torch.tensor([[True, True, True], [True, True, False]])


def _rank_weights_by_hand():
    pos0 = _norm([1.0, math.exp(-0.5), math.exp(-1.0)])  # exp(-rank / lambda), lambda = 2
    conf0, cons0 = [0.6, 0.3, 0.1], [0.5, 0.0, 0.5]  # items 3 and 1 are in the student's top-3, item 0 is not
    w0 = _norm([0.3 * p + 0.5 * c + 0.1 * o for p, c, o in zip(pos0, conf0, cons0)])
    pos1 = _norm([1.0, math.exp(-0.5)]) + [0.0]  # the invalid entry drops out of every part
    conf1 = [0.25, 0.75, 0.0]  # softmax(log 1, log 3) over the valid entries
    # consistency: the only teacher item in the student's top-3 (item 0) is invalid -> all 0, the part drops out
    w1 = _norm([0.3 * p + 0.5 * c for p, c in zip(pos1, conf1)])
    return torch.tensor([w0, w1])


def test_rank_kd_importance_weights_match_hand_values():
    rk = RankingDistillation(top_k=3, lam=2.0, gammas=(0.3, 0.5, 0.1))
    w = rk.weights(RK_S, RK_ITEMS, RK_T, RK_VALID)
    assert torch.allclose(w, _rank_weights_by_hand(), atol=1e-6)
    assert w.sum(-1).tolist() == pytest.approx([1.0, 1.0])
    # lambda sets the position decay; only the ratios of the gammas matter
    pos_only = RankingDistillation(top_k=3, lam=1.0, gammas=(2.0, 0.0, 0.0)).weights(RK_S, RK_ITEMS, RK_T)
    assert pos_only[0].tolist() == pytest.approx(_norm([1.0, math.exp(-1.0), math.exp(-2.0)]))
    scaled = RankingDistillation(top_k=3, lam=2.0, gammas=(3.0, 5.0, 1.0)).weights(RK_S, RK_ITEMS, RK_T, RK_VALID)
    assert torch.allclose(scaled, w, atol=1e-6)
    # consistency alone: uniform over the teacher items the student's top-k also holds
    cons = RankingDistillation(top_k=3, gammas=(0.0, 0.0, 1.0)).weights(RK_S, RK_ITEMS, RK_T, RK_VALID)
    assert cons.tolist() == [[0.5, 0.0, 0.5], [0.0, 0.0, 0.0]]


def test_rank_kd_is_the_hand_weighted_cross_entropy_and_its_gradient():
    rk = RankingDistillation(top_k=3, lam=2.0, gammas=(0.3, 0.5, 0.1))
    s = RK_S.clone().requires_grad_(True)
    loss = rk(s, RK_ITEMS, RK_T, RK_VALID)
    w = _rank_weights_by_hand()
    for r in range(2):
        lse = math.log(sum(math.exp(x) for x in RK_S[r].tolist()))
        expected = -sum(float(w[r, k]) * (float(RK_S[r, RK_ITEMS[r, k]]) - lse) for k in range(3))
        assert loss[r].item() == pytest.approx(expected, rel=1e-5)
    # the weights are constants: the gradient is that of a cross-entropy against them, softmax(s) - w
    loss.sum().backward()
    target = torch.zeros_like(RK_S).scatter_add_(-1, RK_ITEMS, w)
    assert torch.allclose(s.grad, torch.softmax(RK_S, -1) - target, atol=1e-6)
    # k beyond the cached list uses what is there
    assert torch.allclose(RankingDistillation(50, 2.0)(RK_S, RK_ITEMS, RK_T, RK_VALID),
                          RankingDistillation(3, 2.0)(RK_S, RK_ITEMS, RK_T, RK_VALID))


def test_rank_kd_is_lower_for_a_student_in_the_teachers_order():
    torch.manual_seed(0)
    n, k = 30, 10
    t_items = torch.randperm(n)[:k][None]
    t_logits = torch.sort(torch.randn(1, k), descending=True).values
    right = torch.zeros(1, n).scatter(-1, t_items, torch.arange(k, 0, -1, dtype=torch.float32)[None] * 2.0)
    wrong = torch.zeros(1, n).scatter(-1, t_items, torch.arange(1, k + 1, dtype=torch.float32)[None] * 2.0)
    rk = RankingDistillation(top_k=k)
    # the same items in the student's top-k either way: only the order differs
    assert torch.equal(rk.weights(right, t_items, t_logits), rk.weights(wrong, t_items, t_logits))
    assert rk(right, t_items, t_logits).item() < rk(wrong, t_items, t_logits).item()


def test_rank_kd_gives_excluded_items_no_gradient():
    batch, out = _batch(), _out()
    exclude = torch.zeros(N, dtype=torch.bool)
    cold = [int(batch["t_items"][0, 1, 0]), int(batch["t_items"][1, 2, 2])]  # the teacher's first / third choice
    exclude[cold] = True
    batch["labelled"] &= ~torch.isin(batch["items"], torch.tensor(cold))
    obj = _objective(exclude=exclude, kd_alpha=1.0, kd_next_item=0.0, kd_listwise=0.0, kd_rating=0.0, kd_like=0.0,
                     kd_align=0.0, kd_rank=1.0, rank_kd_top_k=3)
    losses, _, logged = obj(_sel(out, batch), batch)
    losses["next_item"].backward()  # alpha = 1 on every (teacher-labelled) position: the rank KD term alone
    g = out["next_item"].grad
    assert g[..., cold].abs().max().item() == 0.0 and g[..., ~exclude].abs().sum().item() > 0
    # the value: the module on the masked logits, the cold entries marked invalid
    m = batch["labelled"]
    s = out["next_item"].detach()[m].masked_fill(exclude, -1e4)
    ref = RankingDistillation(3)(s, batch["t_items"][m], batch["t_logits"][m], ~exclude[batch["t_items"][m]])
    assert logged["next_item/rank_kd"] == pytest.approx(ref.mean().item(), rel=1e-5)
    assert losses["next_item"].item() == pytest.approx(ref.mean().item(), rel=1e-5)
    assert logged["next_item/rank_kd"] < 20  # an excluded item kept in the list would cost -log p ~ 1e4
    # a row whose every teacher item is excluded gives 0, not NaN
    none = RankingDistillation(3)(RK_S, RK_ITEMS, RK_T, torch.zeros_like(RK_VALID))
    assert none.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("bad, field", [({"kd_rank": -0.5}, "kd_rank"), ({"rank_kd_top_k": 0}, "rank_kd_top_k"),
                                        ({"rank_kd_lambda": 0.0}, "rank_kd_lambda"),
                                        ({"rank_kd_gamma_confidence": -0.1}, "rank_kd_gamma_confidence"),
                                        ({"rank_kd_gamma_position": 0.0, "rank_kd_gamma_confidence": 0.0,
                                          "rank_kd_gamma_consistency": 0.0}, "all 0")])
def test_rank_kd_config_is_validated(bad, field):
    with pytest.raises(ValueError, match=field):
        DistillationObjective(replace(StudentConfig(), **{"kd_rank": 1.0, **bad}), TASKS, DS)
    sc = StudentConfig()
    assert sc.kd_rank == 0.0 and (sc.rank_kd_top_k, sc.rank_kd_lambda) == (10, 1.0)
    DistillationObjective(sc, TASKS, DS)  # the defaults are valid


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
    names = {"kd_next_item": "next_item/kl", "kd_listwise": "next_item/listwise", "kd_rank": "next_item/rank_kd",
             "kd_rating": "rating/kd", "kd_like": "like/kd", "kd_align": "align"}
    full = _objective(kd_rank=1.0)(_sel(out, batch), batch)[2]
    assert set(names.values()) <= set(full)
    for field, name in names.items():
        logged = _objective(**{"kd_rank": 1.0, field: 0.0})(_sel(out, batch), batch)[2]
        assert name not in logged
        assert set(names.values()) - {name} <= set(logged)


def test_kd_rank_zero_leaves_the_objective_unchanged_and_is_added_inside_next_item_kd():
    ht = torch.tensor([[True, False, True, True], [False, True, True, True]])
    batch, out = _batch(has_teacher=ht), _out()
    base = _objective(kd_alpha=0.4, kd_align=0.0)  # (the projector is random)
    assert base.components()["rank"] == 0.0
    losses0, _, logged0 = base(_sel(out, batch), batch)
    assert "next_item/rank_kd" not in logged0
    # the pre-existing objective by hand: hard, KL (top-K scope) and 0.5 * ListMLE, mixed with alpha
    m = batch["labelled"]
    h = ht[m]
    s = out["next_item"][m][h]
    t_items = batch["t_items"][m][h]
    kl = NextItemKL(2.0)(torch.gather(s, -1, t_items), batch["t_logits"][m][h])
    lw = ListwiseRankingLoss(10)(torch.gather(s, -1, t_items))
    nxt = _hard(out, batch)["next_item"].clone()
    nxt[h] = 0.6 * nxt[h] + 0.4 * (kl + 0.5 * lw)
    assert losses0["next_item"].item() == pytest.approx(nxt.mean().item(), rel=1e-5)
    # with kd_rank = 0 the other rank settings change nothing, bit for bit
    other = _objective(kd_alpha=0.4, kd_align=0.0, rank_kd_top_k=2, rank_kd_lambda=5.0, rank_kd_gamma_position=0.0)
    losses1, _, logged1 = other(_sel(out, batch), batch)
    assert all(torch.equal(losses0[t], losses1[t]) for t in TASKS) and logged0 == logged1
    # switched on, it adds alpha * kd_rank * RankKD at the teacher positions, and is logged unweighted
    losses2, _, logged2 = _objective(kd_alpha=0.4, kd_align=0.0, kd_rank=0.7)(_sel(out, batch), batch)
    rk = RankingDistillation(10)(s.detach(), t_items, batch["t_logits"][m][h])
    assert logged2["next_item/rank_kd"] == pytest.approx(rk.mean().item(), rel=1e-5)
    assert (losses2["next_item"] - losses0["next_item"]).item() == pytest.approx(0.4 * 0.7 * rk.sum().item() / len(h),
                                                                                 rel=1e-4)
    assert losses2["rating"].item() == losses0["rating"].item() and losses2["like"].item() == losses0["like"].item()


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
    obj = _objective(scope=scope, exclude=exclude, kd_rank=1.0)
    losses, align, logged = obj(_sel(out, batch), batch)
    assert "next_item/rank_kd" in logged
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
