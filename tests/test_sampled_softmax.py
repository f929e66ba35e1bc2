"""student.next_item_loss=sampled: the logQ-corrected sampled softmax (distill.losses.sampled_softmax_loss,
NegativeSampler, sampling_distribution), the student's candidate scoring without the [P, N] logits
(Student.forward_positions(catalog=False), score_items), the sampled next_item KD, and the config checks."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.config import ConfigError, DataConfig, StudentConfig
from distill.data import Split, load_dataset
from distill.losses import (POPULARITY_POWER, DistillationObjective, NegativeSampler, RankingDistillation,
                            _member, _repeats, sampled_softmax_loss, sampling_distribution)
from distill.student import Student
from distill.student_stage import fit_student

TASKS = ["next_item", "rating", "like"]
N, TEXT, K = 30, 8, 6


def _student(seed=0, **kw) -> Student:
    torch.manual_seed(seed)
    cfg = StudentConfig(dim=16, layers=1, heads=2, max_len=10, tower_hidden=16, dropout=0.0, **kw)
    m = Student(cfg, N, TASKS, text_vectors=torch.randn(N, TEXT))
    with torch.no_grad():
        m.item_bias.normal_()  # a non-zero bias, so that a missing bias term shows
    return m


def _batch(seed=0, items_from=None, teacher=True):
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(N) if items_from is None else items_from
    items = pool[torch.randint(0, len(pool), (3, 10), generator=g)]
    labelled = torch.zeros(3, 10, dtype=torch.bool)
    labelled[:, 4:] = True
    b = dict(items=items, ratings=torch.randint(1, 6, (3, 10), generator=g).float(), length=torch.full((3,), 10),
             labelled=labelled, has_teacher=torch.ones(3, 10, dtype=torch.bool))
    if teacher:
        b.update(t_items=torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(30)]).view(3, 10, K),
                 t_logits=torch.sort(torch.randn(3, 10, K, generator=g), descending=True).values,
                 t_rating=torch.full((3, 10), 3.5), t_like=torch.zeros(3, 10), t_user=torch.randn(3, 10, 6))
    return b


def _objective(cfg: StudentConfig, counts=None, exclude=None, use_teacher=True):
    return DistillationObjective(cfg, TASKS, cfg.dim, use_teacher=use_teacher, teacher_dim=6,
                                 exclude_items=exclude, n_items=N,
                                 item_counts=torch.arange(N) if counts is None else counts)


def _fixed_negatives(obj, ids):
    """Replace the objective's draw by the fixed negatives `ids` (their logQ still read from its q)."""
    ids = torch.as_tensor(ids)
    obj.sampler.forward = lambda: (ids, obj.sampler.log_expected[ids])


# ----------------------------------------------------------------------------- the loss itself
def test_every_item_once_at_uniform_q_is_exactly_the_full_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, N, generator=g, requires_grad=True)
    target = torch.randint(0, N, (7,), generator=g)
    neg = torch.arange(N)
    log_expected = torch.log(torch.full((N,), N * (1.0 / N)))  # M q = 1: no correction
    pos = logits.gather(1, target[:, None])[:, 0]
    loss = sampled_softmax_loss(pos, logits, log_expected, hit=neg[None, :] == target[:, None])
    full = F.cross_entropy(logits, target, reduction="none")
    assert torch.allclose(loss, full, atol=1e-6)
    g1, = torch.autograd.grad(loss.sum(), logits)
    g2, = torch.autograd.grad(full.sum(), logits)
    assert torch.allclose(g1, g2, atol=1e-6)
    # without masking the accidental hit the positive would be counted twice in the normaliser: a larger loss
    unmasked = sampled_softmax_loss(pos, logits, log_expected)
    assert (unmasked > full + 1e-3).all()


@pytest.mark.parametrize("kind", ["uniform", "popularity"])
def test_many_negatives_converge_to_the_full_cross_entropy_and_its_gradient(kind):
    g = torch.Generator().manual_seed(1)
    logits = (2 * torch.randn(4, N, generator=g)).requires_grad_(True)
    target = torch.randint(0, N, (4,), generator=g)
    counts = torch.randint(0, 300, (N,), generator=g) * (torch.rand(N, generator=g) < 0.7)  # skewed, ~30% zero
    q = sampling_distribution(kind, N, counts)
    torch.manual_seed(0)
    neg, log_expected = NegativeSampler(q, 200_000)()
    pos = logits.gather(1, target[:, None])[:, 0]
    loss = sampled_softmax_loss(pos, logits[:, neg], log_expected, neg[None, :] == target[:, None])
    full = F.cross_entropy(logits, target, reduction="none")
    # tolerance: 4 standard errors of log Z_hat ~ std(Z_hat) / Z, from Var[exp(s_n) / q_n] = sum exp(2 s) / q - Z^2
    e = logits.detach().double().exp()
    rel_se = (((e ** 2 / q).sum(1) - e.sum(1) ** 2).sqrt() / e.sum(1) / math.sqrt(len(neg))).float()
    assert ((loss - full).abs() <= 4 * rel_se + 1e-3).all()
    g1, = torch.autograd.grad(loss.sum(), logits)
    g2, = torch.autograd.grad(full.sum(), logits)
    assert ((g1 - g2).abs() <= 4 * rel_se[:, None] + 1e-3).all()
    if kind == "popularity":  # the logQ correction is what makes it consistent: without it the loss is far off
        flat = torch.full_like(log_expected, math.log(len(neg) / N))
        biased = sampled_softmax_loss(pos, logits[:, neg], flat, neg[None, :] == target[:, None])
        assert (biased - full).abs().max() > 20 * rel_se.max()


def test_accidental_hits_are_masked_out():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, 5, generator=g)
    pos = torch.randn(3, generator=g)
    target = torch.tensor([7, 8, 9])
    neg = torch.tensor([7, 1, 9, 2, 7])  # row 0's positive twice, row 2's once
    le = torch.randn(5, generator=g)
    loss = sampled_softmax_loss(pos, s, le, neg[None, :] == target[:, None])
    for r, keep in enumerate([[1, 2, 3], [0, 1, 2, 3, 4], [0, 1, 3, 4]]):
        ref = torch.logsumexp(torch.cat([pos[r:r + 1], s[r, keep] - le[keep]]), 0) - pos[r]
        assert loss[r].item() == pytest.approx(ref.item(), abs=1e-6)


# ----------------------------------------------------------------------------- the proposal q
def test_popularity_q_is_counts_plus_one_to_the_power_normalised_and_excluded_items_have_zero():
    counts = torch.tensor([0, 1, 5, 100, 7, 0, 3, 30])
    exclude = torch.zeros(8, dtype=torch.bool)
    exclude[[3, 5]] = True
    q = sampling_distribution("popularity", 8, counts, exclude)
    w = (counts.double() + 1) ** POPULARITY_POWER
    w[exclude] = 0
    assert POPULARITY_POWER == 0.75
    assert torch.allclose(q, w / w.sum()) and q.sum().item() == pytest.approx(1.0)
    u = sampling_distribution("uniform", 8, exclude=exclude)
    assert torch.allclose(u, torch.where(exclude, 0.0, 1 / 6).double())
    s = NegativeSampler(q, 64)
    assert torch.allclose(s.log_expected[~exclude], torch.log(64 * q[~exclude]).float())
    torch.manual_seed(0)
    draws = torch.cat([s()[0] for _ in range(3000)])  # 192k draws
    freq = torch.bincount(draws, minlength=8).double() / len(draws)
    assert freq[exclude].sum() == 0  # excluded items are never drawn
    assert torch.allclose(freq, q, atol=0.005)
    with pytest.raises(ValueError, match="sampler=uniform"):
        sampling_distribution("popularity", 8)  # no counts


def test_member_and_repeats_helpers():
    ids = torch.tensor([4, 2, 9, 2, 4, 4])
    lists = torch.tensor([[9, 1, 4], [0, 3, 5]])
    assert _member(ids, lists).tolist() == [[True, False, True, False, True, True], [False] * 6]
    assert _repeats(ids).tolist() == [False, False, False, True, True, True]


# ----------------------------------------------------------------------------- the student's candidate path
def test_candidate_scores_equal_the_catalog_logits_with_id_dropout_and_no_table_is_built(monkeypatch):
    m = _student(id_dropout=0.4).train()
    b = _batch(teacher=False)
    args = (b["items"], b["ratings"], b["length"])
    torch.manual_seed(3)
    full = m.forward_positions(*args, select=b["labelled"])
    drop_full = m._id_drop.clone()
    monkeypatch.setattr(m, "item_table", lambda: pytest.fail("the sampled path built the [N, d] item table"))
    torch.manual_seed(3)
    out = m.forward_positions(*args, select=b["labelled"], catalog=False)
    assert torch.equal(m._id_drop, drop_full) and 0 < int(drop_full.sum()) < N  # the same ID-dropout draw
    assert "next_item" not in out
    for k in ("user_vector", "rating", "like", "state"):
        assert torch.allclose(out[k], full[k], atol=1e-5)
    shared = torch.tensor([0, 5, 5, 29, 11])
    assert torch.allclose(out["score_items"](out["user_vector"], shared), full["next_item"][:, shared], atol=1e-5)
    per_row = torch.randint(0, N, (len(out["user_vector"]), 4))
    for dense in (32, 0):  # both ways of scoring per-row lists
        monkeypatch.setattr(m, "DENSE_ROWS", dense)
        assert torch.allclose(out["score_items"](out["user_vector"], per_row), full["next_item"].gather(1, per_row),
                              atol=1e-5)
    # a dropped item is scored from its text alone, without its bias
    d = int(torch.nonzero(drop_full)[0])
    s = out["score_items"](out["user_vector"], torch.tensor([d]))[:, 0]
    assert torch.allclose(s, out["user_vector"] @ m.text_proj(m.text_vectors[d]), atol=1e-5)


def test_gradient_reaches_only_the_candidate_rows():
    m = _student(id_dropout=0.0).train()
    b = _batch()
    cfg = replace(m.cfg, next_item_loss="sampled", sampled_negatives=4)
    for use_teacher in (False, True):
        m.zero_grad()
        obj = _objective(cfg, use_teacher=use_teacher)
        negatives = [2, 17, 17, 25]
        _fixed_negatives(obj, negatives)
        out = m.forward_positions(b["items"], b["ratings"], b["length"], select=b["labelled"], catalog=False)
        losses, align, _ = obj(out, b)
        (sum(losses.values()) + (align if align is not None else 0)).backward()
        cand = set(negatives) | set(b["items"][b["labelled"]].tolist())
        if use_teacher:
            cand |= set(b["t_items"][b["labelled"]].flatten().tolist())
        assert set(torch.nonzero(m.item_bias.grad).flatten().tolist()) == cand
        inputs = set(b["items"].flatten().tolist())  # the history's items (encoder inputs; full windows here)
        emb = set(torch.nonzero(m.id_emb.weight.grad.abs().sum(1)).flatten().tolist())
        assert set(negatives) <= emb <= cand | inputs
        if not use_teacher:
            assert len(cand | inputs) < N  # there ARE rows without gradient


def test_excluded_and_dropped_items_get_no_gradient_in_the_sampled_mode():
    cold = torch.tensor([3, 8, 21])
    exclude = torch.zeros(N, dtype=torch.bool)
    exclude[cold] = True
    warm = torch.nonzero(~exclude).flatten()
    m = _student(seed=1, id_dropout=0.3).train()
    cfg = replace(m.cfg, next_item_loss="sampled", sampled_negatives=256, kd_rank=1.0, sampler="uniform")
    obj = _objective(cfg, exclude=exclude)
    seen_drop = torch.zeros(N, dtype=torch.bool)
    for step in range(3):
        b = _batch(seed=step, items_from=warm)  # their events are dropped from training data ...
        b["t_items"][:, :, 1] = cold[step]  # ... but the teacher's lists contain them
        m.zero_grad()
        torch.manual_seed(step)
        out = m.forward_positions(b["items"], b["ratings"], b["length"], select=b["labelled"], catalog=False)
        losses, align, logged = obj(out, b)
        assert "next_item/rank_kd" in logged and all(torch.isfinite(v) for v in losses.values())
        (sum(losses.values()) + align).backward()
        drop = m._id_drop
        seen_drop |= drop
        assert (m.id_emb.weight.grad[cold] == 0).all() and (m.item_bias.grad[cold] == 0).all()
        assert (m.id_emb.weight.grad[drop] == 0).all() and (m.item_bias.grad[drop] == 0).all()
        assert (m.item_bias.grad[~drop & ~exclude] != 0).sum() > N // 3  # 256 negatives reach most warm items
    assert seen_drop.any()


# ----------------------------------------------------------------------------- the objective
def test_sampled_objective_with_every_item_once_at_uniform_q_is_the_full_objective():
    """Negatives = every item once, q = 1/N, M = N: M q = 1 (no correction) and, with the row's own positive
    masked as an accidental hit, the hard CE is the catalog CE; KL and ListMLE read only the student's scores at
    the teacher's top-K: every loss equals the full mode's (kd_scope topk)."""
    m = _student(seed=2).train()
    b = _batch(seed=4)
    base = replace(m.cfg, kd_scope="topk", kd_alpha=0.5, kd_align=0.0)
    torch.manual_seed(0)
    full_out = m.forward_positions(b["items"], b["ratings"], b["length"], select=b["labelled"])
    full_losses, _, full = _objective(base)(full_out, b)
    obj = _objective(replace(base, next_item_loss="sampled", kd_scope="auto", sampler="uniform", sampled_negatives=N))
    assert obj.scope == "topk" and obj.components()["next_item_loss"] == "sampled"
    assert torch.allclose(obj.sampler.log_expected, torch.zeros(N), atol=1e-6)
    _fixed_negatives(obj, torch.arange(N))
    torch.manual_seed(0)
    out = m.forward_positions(b["items"], b["ratings"], b["length"], select=b["labelled"], catalog=False)
    losses, _, samp = obj(out, b)
    assert set(samp) == set(full)
    for k in full:
        assert samp[k] == pytest.approx(full[k], rel=1e-5), k
    for t in TASKS:
        assert losses[t].item() == pytest.approx(full_losses[t].item(), rel=1e-5)


def test_sampled_rank_kd_with_every_item_once_is_the_catalog_rank_kd():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, N, generator=g)
    t_items = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(6)])
    t_logits = torch.sort(torch.randn(6, K, generator=g), descending=True).values
    valid = torch.ones(6, K, dtype=torch.bool)
    valid[1, 2] = False
    rk = RankingDistillation(top_k=4, gammas=(0.3, 0.5, 0.4))
    ref = rk(logits.masked_fill(torch.zeros(6, N, dtype=torch.bool).scatter(1, t_items[1:2, 2:3].expand(6, 1),
                                                                           torch.tensor([[False]] * 6)), -1e4),
             t_items, t_logits, valid)
    s_top = logits.gather(1, t_items).masked_fill(~valid, -1e4)
    neg = torch.arange(N)
    got = rk.forward_sampled(s_top, t_items, t_logits, valid, neg, logits, torch.zeros(N))
    # row 1's invalid item still counts in the catalog normaliser of `ref` but not in the sampled one: compare
    # the other rows exactly, and row 1 against the catalog loss with that item removed from the catalog
    keep = [0, 2, 3, 4, 5]
    assert torch.allclose(got[keep], ref[keep], atol=1e-5)
    masked = logits.clone()
    masked[1, t_items[1, 2]] = -1e4
    assert got[1].item() == pytest.approx(rk(masked[1:2], t_items[1:2], t_logits[1:2], valid[1:2]).item(), abs=1e-5)
    # the consistency weight compares with the student's top-k among the candidates: here the catalog's
    w_cat = rk.weights(logits, t_items, t_logits, valid)
    cand = torch.cat([s_top, logits.masked_fill(_member(neg, t_items), -1e4)], 1)
    w_samp = rk.weights(cand, t_items, t_logits, valid, support=torch.cat([t_items, neg.expand(6, -1)], 1))
    assert torch.allclose(w_cat[keep], w_samp[keep], atol=1e-6)


# ----------------------------------------------------------------------------- config
def test_config_choices_and_errors():
    sc = StudentConfig()
    assert (sc.next_item_loss, sc.sampler, sc.sampled_negatives) == ("full", "popularity", 1024)
    with pytest.raises(ConfigError, match=r"kd_scope.*kd_scope=topk.*next_item_loss=full"):
        StudentConfig(next_item_loss="sampled", kd_scope="catalog")
    with pytest.raises(ConfigError, match="sampled_negatives"):
        StudentConfig(next_item_loss="sampled", sampled_negatives=0)
    with pytest.raises(ConfigError, match="sampler"):
        StudentConfig(sampler="zipf")
    with pytest.raises(ConfigError, match="next_item_loss"):
        StudentConfig(next_item_loss="nce")
    cfg = StudentConfig(dim=16, heads=2, next_item_loss="sampled")
    # 'auto' resolves to top-K even when the catalog is available to the full mode
    obj = DistillationObjective(cfg, TASKS, 16, teacher_dim=6, item_table=torch.randn(N, 6), item_bias=torch.zeros(N),
                                item_counts=torch.ones(N))
    assert obj.scope == "topk" and not obj.needs_user_vectors or obj.align is not None
    with pytest.raises(ValueError, match="item counts|sampler=uniform"):
        DistillationObjective(cfg, TASKS, 16, n_items=N)  # popularity without the counts
    DistillationObjective(replace(cfg, sampler="uniform"), TASKS, 16, n_items=N)
    with pytest.raises(ValueError, match="catalog logits"):  # catalog outputs given to the sampled objective
        obj({"next_item": torch.zeros(2, N)}, _batch())


def test_fit_student_trains_with_the_sampled_softmax():
    split = Split.leave_last_out(load_dataset(DataConfig()))
    sc = StudentConfig(dim=16, layers=1, heads=2, max_len=20, tower_hidden=16, use_text_vectors=False, epochs=1,
                       max_steps_per_epoch=2, next_item_loss="sampled", sampled_negatives=64)
    fit = fit_student(sc, split, None, use_teacher=False, seed=0)
    h = fit.history[0]
    assert fit.steps == 2 and np.isfinite(h["next_item"]) and 0 <= h["val_ndcg@10"] <= 1
    assert fit.components["sampler"] == "popularity" and fit.components["sampled_negatives"] == 64
