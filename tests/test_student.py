"""The student: cold-start item representation through the frozen text vectors, causal consistency of the
training and serving paths, persistence, and the training data (windows, teacher rows, held-out items)."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from distill.config import DataConfig, StudentConfig
from distill.data import Dataset, Split, load_dataset
from distill.losses import DistillationObjective
from distill.student import Student
from distill.student_stage import (build_training_arrays, cold_item_slice, fit_student, items_seen, student_windows,
                                   training_budget)

TASKS = ["next_item", "rating", "like"]
N_ITEMS, TEXT = 20, 8


def _student(use_text=True, seed=0, **kw) -> Student:
    torch.manual_seed(seed)
    cfg = StudentConfig(dim=16, layers=2, heads=2, max_len=10, tower_hidden=16, dropout=0.0,
                        use_text_vectors=use_text, **kw)
    return Student(cfg, N_ITEMS, TASKS, text_vectors=torch.randn(N_ITEMS, TEXT) if use_text else None)


@pytest.fixture(scope="module")
def split():
    return Split.leave_last_out(load_dataset(DataConfig()))


# ----------------------------------------------------------------------------- cold start
def test_unseen_item_is_represented_by_its_text_vector():
    m = _student().eval()
    with torch.no_grad():  # items 3 and 4: the same (never trained) ID embedding, different texts
        m.id_emb.weight[4] = m.id_emb.weight[3]
    table = m.item_table()
    assert torch.allclose(table[3] - m.id_emb.weight[3], m.text_proj(m.text_vectors[3]))
    assert not torch.allclose(table[3], table[4])
    hist = (torch.tensor([[1, 2]]), torch.tensor([[4.0, 3.0]]), torch.tensor([2]), torch.tensor([[3, 4]]))
    out = m(*hist)
    assert out["next_item"][0, 3] != out["next_item"][0, 4]
    assert out["rating"][0, 0] != out["rating"][0, 1]
    with torch.no_grad():  # changing only the text vector of an item changes its score
        m.text_vectors[3] += 1.0
    assert m(*hist)["next_item"][0, 3] != out["next_item"][0, 3]


def test_without_text_vectors_an_unseen_item_is_only_its_id_embedding():
    m = _student(use_text=False).eval()
    assert m.text_proj is None
    with torch.no_grad():
        m.id_emb.weight[4] = m.id_emb.weight[3]
    out = m(torch.tensor([[1, 2]]), torch.tensor([[4.0, 3.0]]), torch.tensor([2]), torch.tensor([[3, 4]]))
    assert out["next_item"][0, 3] == out["next_item"][0, 4]


def test_id_dropout_scores_dropped_items_from_text_alone_in_training_only():
    m = _student(id_dropout=0.5)
    with torch.no_grad():
        m.item_bias.copy_(torch.arange(N_ITEMS, dtype=torch.float32))
    hist = (torch.tensor([[1, 2]]), torch.tensor([[4.0, 3.0]]), torch.tensor([2]), torch.tensor([[3, 4]]))
    m.train()
    torch.manual_seed(0)
    table = m.item_table()
    drop = m._id_drop
    assert drop is not None and 0 < int(drop.sum()) < N_ITEMS  # about half of 20 items
    text = m.text_proj(m.text_vectors)
    assert torch.allclose(table[drop], text[drop]) and torch.allclose(table[~drop], (m.id_emb.weight + text)[~drop])
    torch.manual_seed(0)
    z = m.mtl(m.encode(*hist[:3], m.item_table())[:, -1])
    user = m.next_proj(z["next_item"])
    torch.manual_seed(0)
    out = m(*hist)
    expected = user @ table.T + torch.where(drop, 0.0, m.item_bias)  # a dropped item has no bias either
    assert torch.allclose(out["next_item"], expected, atol=1e-5)
    m.eval()  # inference: every item keeps its ID and bias, the mask of the last training step is gone
    assert m._id_drop is None
    full = m.id_emb.weight + text
    assert torch.allclose(m.item_table(), full)
    m.freeze_item_table()
    out = m(*hist)
    assert torch.allclose(out["next_item"], out["user_vector"] @ full.T + m.item_bias, atol=1e-5)
    with pytest.raises(ValueError, match="id_dropout"):
        _student(id_dropout=1.0)


def test_forget_ids_leaves_a_never_seen_item_its_text_vector(split):
    m = _student(id_dropout=0.3).eval()
    unseen = torch.zeros(N_ITEMS, dtype=torch.bool)
    unseen[[2, 7]] = True
    m.freeze_item_table()
    m.forget_ids(unseen)
    table = m.item_table()  # the frozen table was dropped: recomputed from the new weights
    text = m.text_proj(m.text_vectors)
    assert torch.allclose(table[unseen], text[unseen]) and not torch.allclose(table[~unseen], text[~unseen])
    assert (m.item_bias[unseen] == 0).all()
    arrays = build_training_arrays(split, 10, None, exclude_items=np.array([0, 5]))
    seen = items_seen(arrays, split.ds.n_items)
    assert not seen[0] and not seen[5] and seen.sum() == len(np.unique(
        np.concatenate([split.train_items(u) for u in range(split.ds.n_users)]))) - 2


def test_held_out_items_never_get_a_gradient_during_training():
    m = _student(seed=1).train()
    cfg = replace(m.cfg, kd_scope="topk")
    cold = torch.tensor([5, 11])
    exclude = torch.zeros(N_ITEMS, dtype=torch.bool)
    exclude[cold] = True
    obj = DistillationObjective(cfg, TASKS, 16, teacher_dim=6, exclude_items=exclude)
    opt = torch.optim.AdamW(list(m.parameters()) + list(obj.parameters()), lr=1e-2, weight_decay=0.0)
    before_emb, before_bias = m.id_emb.weight.detach().clone(), m.item_bias.detach().clone()
    before_table = m.item_table().detach().clone()
    g = torch.Generator().manual_seed(0)
    warm = torch.tensor([i for i in range(N_ITEMS) if i not in cold.tolist()])
    for _ in range(5):
        items = warm[torch.randint(0, len(warm), (4, 10), generator=g)]
        # the teacher's top-K lists DO contain the cold items: they must be masked out
        t_items = torch.stack([torch.randperm(N_ITEMS, generator=g)[:6] for _ in range(40)]).view(4, 10, 6)
        batch = dict(items=items, ratings=torch.randint(1, 6, (4, 10), generator=g).float(),
                     labelled=torch.ones(4, 10, dtype=torch.bool), has_teacher=torch.ones(4, 10, dtype=torch.bool),
                     t_items=t_items, t_logits=torch.sort(torch.randn(4, 10, 6, generator=g), descending=True).values,
                     t_rating=torch.full((4, 10), 3.5), t_like=torch.zeros(4, 10), t_user=torch.randn(4, 10, 6))
        out = m.forward_positions(batch["items"], batch["ratings"], torch.full((4,), 10), select=batch["labelled"])
        losses, align, _ = obj(out, batch)
        opt.zero_grad()
        (sum(losses.values()) + align).backward()
        opt.step()
    assert torch.equal(m.id_emb.weight[cold], before_emb[cold])  # still at init
    assert torch.equal(m.item_bias[cold], before_bias[cold])
    assert not torch.allclose(m.id_emb.weight[warm], before_emb[warm])
    # ... yet the cold items' table rows moved with the learned text projection
    assert not torch.allclose(m.item_table()[cold], before_table[cold])


def test_cold_item_slice_is_seeded_and_sized():
    a = cold_item_slice(1682, 0.05, seed=0)
    assert len(a) == 84 and len(np.unique(a)) == 84 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, cold_item_slice(1682, 0.05, seed=0))
    assert not np.array_equal(a, cold_item_slice(1682, 0.05, seed=1))
    assert len(cold_item_slice(1682, 0.0, seed=0)) == 0
    with pytest.raises(ValueError):
        cold_item_slice(10, 1.0, 0)


# ----------------------------------------------------------------------------- encoder paths
def test_training_positions_match_serving_on_each_prefix():
    """Position j of forward_positions (the state before item j) = forward() on the first j items."""
    m = _student(seed=2).eval()
    items = torch.tensor([[0, 0, 0, 7, 3, 9, 1, 4, 2, 8]])  # left-padded: 7 real items
    ratings = torch.tensor([[0, 0, 0, 5, 3, 4, 1, 2, 5, 4]]).float()
    length = torch.tensor([7])
    with torch.no_grad():
        pos = m.forward_positions(items, ratings, length)
        for j in range(3, 10):
            n = j - 3  # items before position j
            h_items = torch.zeros(1, 10, dtype=torch.long)
            h_ratings = torch.zeros(1, 10)
            if n:
                h_items[0, 10 - n:] = items[0, 3:j]
                h_ratings[0, 10 - n:] = ratings[0, 3:j]
            out = m(h_items, h_ratings, torch.tensor([n]), items[:, j:j + 1])
            assert torch.allclose(out["next_item"][0], pos["next_item"][0, j], atol=1e-5)
            assert torch.allclose(out["rating"][0, 0], pos["rating"][0, j, 0], atol=1e-5)
            assert torch.allclose(out["like"][0, 0], pos["like"][0, j, 0], atol=1e-5)


def test_selected_positions_equal_the_full_outputs():
    m = _student(seed=3).eval()
    items, ratings = torch.randint(0, N_ITEMS, (3, 6)), torch.randint(1, 6, (3, 6)).float()
    length = torch.tensor([6, 2, 4])
    select = torch.rand(3, 6, generator=torch.Generator().manual_seed(0)) > 0.4
    with torch.no_grad():
        full = m.forward_positions(items, ratings, length)
        part = m.forward_positions(items, ratings, length, select=select)
    for k in ("next_item", "rating", "like", "state"):
        assert part[k].shape[0] == int(select.sum())
        assert torch.allclose(part[k], full[k][select], atol=1e-6)


def test_empty_history_is_finite():
    m = _student().eval()
    out = m(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5), torch.tensor([0, 0]), torch.tensor([[1], [2]]))
    assert all(torch.isfinite(v).all() for v in out.values())


def test_save_load_roundtrip_keeps_config_and_outputs(tmp_path):
    m = _student(mtl="ple", n_experts=2, n_shared_experts=3, ple_levels=2, kd_listwise=0.0).eval()
    m.save(tmp_path / "s", extra=dict(kd=True))
    back = Student.load(tmp_path / "s")
    assert back.cfg == m.cfg and back.cfg.n_shared_experts == 3 and back.cfg.ple_levels == 2
    args = (torch.tensor([[1, 2, 3]]), torch.tensor([[5.0, 4.0, 1.0]]), torch.tensor([3]), torch.tensor([[4, 5]]))
    with torch.no_grad():
        a, b = m(*args), back(*args)
    assert all(torch.allclose(a[k], b[k]) for k in a)
    counts = back.param_counts()
    assert counts["params"] == sum(p.numel() for p in back.parameters())
    assert counts["buffers"] >= N_ITEMS * TEXT and counts["total"] == counts["params"] + counts["buffers"]


# ----------------------------------------------------------------------------- training data
def test_windows_label_every_position_exactly_once():
    wins = student_windows([0, 3, 10, 23], max_len=10, stride=5)
    for u, n in enumerate([0, 3, 10, 23]):
        labelled = [j for (uu, s, e, first) in wins if uu == u for j in range(first, e)]
        assert sorted(labelled) == list(range(n))
    assert all(e - s <= 10 for (_, s, e, _) in wins)
    assert all(first - s >= 5 for (_, s, e, first) in wins if first > 0)  # context after the first window


def _fake_cache(split, users):
    """A cache whose row for (u, j) stores u's j-th training item as its top-1: checks row alignment."""
    lengths = [int(split.n_train[u]) for u in users]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    top = np.concatenate([split.train_items(u) for u in users]).astype(np.int32)[:, None]
    return dict(users=np.asarray(users), offsets=offsets, next_topk_items=top)


def test_training_arrays_align_teacher_rows_with_and_without_held_out_items(split):
    users = [0, 5, 42]
    cache = _fake_cache(split, users)
    cold = cold_item_slice(split.ds.n_items, 0.05, seed=0)
    for exclude in (None, cold):
        a = build_training_arrays(split, 50, cache, exclude_items=exclude)
        lab = a["labelled"]
        kept = sum(int((~np.isin(split.train_items(u), cold if exclude is not None else [])).sum())
                   for u in range(split.ds.n_users))
        assert lab.sum() == kept  # every kept training event is labelled exactly once
        has = a["rows"] >= 0
        assert np.array_equal(cache["next_topk_items"][a["rows"][has], 0], a["items"][has])
        n_cached = sum(int((~np.isin(split.train_items(u), cold if exclude is not None else [])).sum())
                       for u in users)
        assert (has & lab).sum() == n_cached
        if exclude is not None:
            real = np.arange(50)[None, :] >= (50 - a["length"])[:, None]
            assert not np.isin(a["items"][real], cold).any()  # neither as input nor as label


# ----------------------------------------------------------------------------- training budget
def test_budget_steps_come_from_the_windows_and_small_logs_get_more_passes():
    sc = StudentConfig(batch_size=128, epochs=20, min_steps_per_epoch=29)
    ml = training_budget(sc, 3586)  # ML-100K's 943 users: one pass is 29 steps, the epochs are unchanged
    assert (ml.steps_per_pass, ml.steps_per_epoch, ml.max_steps, ml.passes_per_epoch) == (29, 29, 580, 1.0)
    small = training_budget(sc, 904)  # a 250-user ML-100K subset: 8 steps per pass
    assert (small.steps_per_pass, small.steps_per_epoch, small.max_steps) == (8, 29, 580)
    assert small.passes_per_epoch == pytest.approx(29 / 8)
    big = training_budget(sc, 20_000)  # more data than ML-100K: one pass per epoch, more steps
    assert (big.steps_per_pass, big.steps_per_epoch, big.max_steps) == (157, 157, 3140)
    # the smaller the log, the more passes over it; the step budget never falls below epochs x min_steps_per_epoch
    # and, for any log up to ML-100K's size, is exactly that (bounded: it does not grow as the log shrinks)
    passes = [training_budget(sc, w).passes_per_epoch * sc.epochs for w in (20_000, 3586, 904, 100, 1)]
    assert passes == sorted(passes) and passes[-1] == 580
    assert {training_budget(sc, w).max_steps for w in (1, 100, 904, 3586)} == {580}
    assert training_budget(replace(sc, min_steps_per_epoch=0), 904).steps_per_epoch == 8  # 0 = one pass per epoch
    assert training_budget(replace(sc, max_steps_per_epoch=2), 904).steps_per_epoch == 2  # the smoke-test cap wins
    assert training_budget(replace(sc, batch_size=64), 904).steps_per_pass == 15
    with pytest.raises(ValueError, match="min_steps_per_epoch"):
        training_budget(replace(sc, min_steps_per_epoch=-1), 904)
    with pytest.raises(ValueError, match="no training windows"):
        training_budget(sc, 0)


def _small_split(n_users=30, n_items=40, length=12, seed=0) -> Split:
    rng = np.random.default_rng(seed)
    items = [rng.choice(n_items, size=length, replace=False).astype(np.int64) for _ in range(n_users)]
    ratings = [rng.integers(1, 6, size=length).astype(np.float32) for _ in range(n_users)]
    ds = Dataset(name="synthetic", user_ids=np.array([f"u{u}" for u in range(n_users)]),
                 item_ids=np.array([f"i{i}" for i in range(n_items)]), item_text=[f"item {i}" for i in range(n_items)],
                 items=items, ratings=ratings, like_threshold=4.0, data_hash="synthetic", source_file="-")
    return Split.leave_last_out(ds)


def _tiny_sc(**kw) -> StudentConfig:
    return StudentConfig(dim=16, layers=1, heads=2, max_len=10, tower_hidden=16, use_text_vectors=False,
                         kd_alpha=0.0, kd_align=0.0, batch_size=8, **kw)


def test_fit_trains_the_step_budget_over_several_passes_of_a_small_log(tmp_path):
    split = _small_split()  # 30 users x 10 training events, max_len 10: 30 windows = 4 steps per pass at batch 8
    sc = _tiny_sc(epochs=3, patience=10, min_steps_per_epoch=10)
    fit = fit_student(sc, split, None, use_teacher=False, seed=0, log_path=tmp_path / "log.jsonl")
    b = fit.budget
    assert (b.windows, b.steps_per_pass, b.steps_per_epoch, b.max_steps) == (30, 4, 10, 30)
    assert fit.stop_reason == "epochs" and len(fit.history) == 3 and fit.steps == 30
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))  # one log line per optimizer step, 2.5 passes per epoch
    assert 0 <= fit.best_epoch < 3


def test_time_budget_stays_the_outer_bound():
    fit = fit_student(_tiny_sc(epochs=5, patience=10, min_steps_per_epoch=10, time_budget_s=1e-9), _small_split(),
                      None, use_teacher=False, seed=0)
    # a 1 ns budget is spent after the first epoch, however fast: one epoch of the step budget, not five
    assert fit.stop_reason == "time_budget" and len(fit.history) == 1 and fit.steps == 10



# ----------------------------------------------------------------------------- small logs: patience in steps
def test_patience_is_at_least_min_patience_steps_so_ml100k_keeps_its_epochs():
    sc = StudentConfig(batch_size=128, patience=5)  # default min_patience_steps: 145 = ML-100K's 5 x 29 steps
    assert sc.min_patience_steps == 145
    assert training_budget(sc, 3586).patience == 5  # ML-100K (29 steps per epoch): unchanged
    assert training_budget(sc, 20_000).patience == 5  # larger logs: `patience` epochs
    assert training_budget(sc, 1875).patience == 10  # a 500-user subset: 15 steps per epoch -> ceil(145 / 15)
    assert training_budget(sc, 904).patience == 19  # a 250-user subset: 8 steps per epoch -> ceil(145 / 8)
    assert training_budget(replace(sc, patience=6), 3586).patience == 6  # configs/gpu.yaml's 6 stays 6
    assert training_budget(replace(sc, min_patience_steps=0), 904).patience == 5  # 0 = patience epochs
    assert training_budget(replace(sc, min_steps_per_epoch=29), 904).patience == 5  # 29-step epochs: 5 suffice
    assert training_budget(sc, 904).as_dict()["patience"] == 19  # what metrics.json records
    with pytest.raises(ValueError, match="min_patience_steps"):
        StudentConfig(min_patience_steps=-1)


def test_fit_stops_on_the_patience_in_steps_not_in_epochs():
    split = _small_split()  # 30 windows at batch 8: 4 steps per epoch
    sc = _tiny_sc(epochs=12, patience=1, min_patience_steps=0)
    short = fit_student(sc, split, None, use_teacher=False, seed=0)
    assert short.budget.patience == 1 and short.stop_reason == "early_stopping"
    assert len(short.history) == short.best_epoch + 2  # stopped one epoch after the best
    long = fit_student(replace(sc, min_patience_steps=100), split, None, use_teacher=False, seed=0)
    assert long.budget.patience == 25  # ceil(100 / 4) > 12 epochs: the run is never cut early
    assert long.stop_reason == "epochs" and len(long.history) == 12 and long.steps == 48
    # the same seed trains the same steps: the first epochs' validation curves agree
    n = len(short.history)
    assert [h["val_ndcg@10"] for h in long.history[:n]] == [h["val_ndcg@10"] for h in short.history]


def test_load_names_a_config_field_this_version_does_not_know(tmp_path):
    import json
    _student().save(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "config.json").read_text())
    meta["student"]["weight_average_decay"] = 0.0  # a field written by another version
    (tmp_path / "s" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"weight_average_decay.*re-run the student stage"):
        Student.load(tmp_path / "s")
