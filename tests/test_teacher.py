"""The LLM teacher: one-pass sequence layout, windows, LoRA merge/save/load, heads, cache staleness."""
import numpy as np
import pytest
import torch
from onepass import assert_one_pass_equals_prefixes

from distill.config import TeacherConfig
from distill.teacher import ByteTokenizer, SequenceBuilder, Teacher, TeacherHeads, add_lora, load_base
from distill.windows import pad_batch, windows

TINY = TeacherConfig(model="tiny-random", lora_last_layers=None, head_dim=16, lora_dropout=0.0)


def test_windows_label_every_position_exactly_once():
    for n in (1, 5, 16, 17, 100):
        wins = windows(n, window=16, context=4)
        labelled = [j for (_, a, b) in wins for j in range(a, b)]
        assert labelled == list(range(n))
        for c, a, b in wins:
            assert c == max(0, a - 4) and b - a <= 16


def test_sequence_layout_reads_the_right_tokens():
    tok = ByteTokenizer()
    b = SequenceBuilder(tok, ["Alpha", "Beta", "Gamma"], max_item_tokens=50, has_ratings=True)
    enc = b.encode(np.array([2, 0]), np.array([5.0, 3.0]))
    text = bytes(i - 3 for i in enc.ids[1:]).decode()  # skip BOS
    assert text.endswith(" Gamma:5\n Alpha:3\n")
    # before item j: the last token before its text; item_end: the last token of its text (the ':')
    assert chr(enc.ids[enc.item_end[0]] - 3) == ":" and chr(enc.ids[enc.item_end[1]] - 3) == ":"
    assert chr(enc.ids[enc.before[1]] - 3) == "\n"  # after item 0's rating
    assert enc.before[0] == len(b.prefix) - 1
    # the target's rating is left out when open_last
    open_enc = b.encode(np.array([2, 0]), np.array([5.0, 0.0]), open_last=True)
    assert open_enc.ids == enc.ids[: enc.item_end[1] + 1]


def test_segments_are_tokenized_separately_and_truncated():
    b = SequenceBuilder(ByteTokenizer(), ["A very long title indeed"], max_item_tokens=4, has_ratings=False)
    assert len(b.item_ids[0]) == 4  # no separator without ratings


def _tiny_teacher(init_lora_weights=True, seed=0):
    backbone, tok = load_base(TINY, seed=seed)
    torch.manual_seed(seed)
    backbone = add_lora(backbone, TINY, init_lora_weights=init_lora_weights)
    heads = TeacherHeads(backbone.config.hidden_size, 16, torch.randn(5, backbone.config.hidden_size),
                         ["next_item", "rating", "like"], torch.log1p(torch.arange(5.0)))
    with torch.no_grad():  # the heads start at priors (zero interaction terms): randomise so outputs depend on h
        for prm in heads.parameters():
            prm.normal_(0, 0.2)
    return Teacher(backbone, heads).eval(), tok


def _batch(tok, seed=0):
    b = SequenceBuilder(tok, [f"item {i}" for i in range(5)], 8, True)
    rng = np.random.default_rng(seed)
    encs = [b.encode(rng.integers(0, 5, n), rng.integers(1, 6, n).astype(float)) for n in (3, 6)]
    ids, mask = pad_batch([e.ids for e in encs], 0)
    rows = torch.tensor([0, 1])
    return ids, mask, (rows, torch.tensor([e.before[-1] for e in encs])), (rows, torch.tensor([e.item_end[-1] for e in encs]))


def test_lora_merge_keeps_outputs_and_lora_is_not_a_noop():
    teacher, tok = _tiny_teacher(init_lora_weights=False)  # random B: LoRA changes the function
    inputs = _batch(tok)
    with torch.no_grad():
        before = teacher(*inputs)
        with teacher.backbone.disable_adapter():
            base = teacher(*inputs)
        teacher.backbone = teacher.backbone.merge_and_unload()
        merged = teacher(*inputs)
    for k in ("next_item", "rating", "like"):
        assert (before[k] - base[k]).abs().max() > 1e-3  # LoRA is active, so the test can fail
    for k in ("next_item", "rating", "like"):
        torch.testing.assert_close(merged[k], before[k], atol=1e-5, rtol=1e-5)


def test_lora_targets_only_the_last_layers():
    cfg = TeacherConfig(model="tiny-random", lora_last_layers=1, target_modules=["q_proj", "v_proj"])
    backbone, _ = load_base(cfg)
    peft_model = add_lora(backbone, cfg)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(names) == 4  # q and v, A and B, in ONE layer
    assert all(".layers.1." in n for n in names)


def test_adapter_save_load_roundtrip(tmp_path):
    from peft import PeftModel
    teacher, tok = _tiny_teacher(init_lora_weights=False)
    inputs = _batch(tok)
    with torch.no_grad():
        ref = teacher.hidden(inputs[0], inputs[1])
    teacher.backbone.save_pretrained(str(tmp_path / "adapter"))
    base, _ = load_base(TINY)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        out = loaded(input_ids=inputs[0], attention_mask=inputs[1]).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_one_pass_equals_reading_each_prefix_alone():
    """The cost model's claim: the state read before item j in one pass over the whole history is what a
    separate prompt holding only the prefix would give (causal attention)."""
    teacher, tok = _tiny_teacher(init_lora_weights=False)
    b = SequenceBuilder(tok, [f"movie {i}" for i in range(5)], 8, True)
    assert_one_pass_equals_prefixes(teacher, b, np.array([1, 3, 0, 4]), np.array([4.0, 2.0, 5.0, 1.0]))


def test_heads_start_at_the_popularity_and_mean_priors():
    heads = TeacherHeads(8, 4, torch.randn(6, 8), ["next_item", "rating", "like"],
                         torch.log1p(torch.tensor([5.0, 0, 1, 9, 2, 3])), rating_mean=3.6, like_logit=0.2)
    out = heads(torch.randn(3, 8), torch.randn(3, 8))
    assert out["next_item"].shape == (3, 6) and out["rating"].shape == (3,) and out["like"].shape == (3,)
    order = out["next_item"][0].argsort(descending=True).tolist()
    assert order[:2] == [3, 0]  # most popular first: the interaction term is zero at init
    torch.testing.assert_close(out["rating"], torch.full((3,), 3.6))
    torch.testing.assert_close(out["like"], torch.full((3,), 0.2))


def _train_tiny(tmp_path, name, refresh: bool):
    import json

    from safetensors.torch import load_file

    from distill.config import load_config
    from distill.teacher_stage import train_teacher
    # 1 user = 4 windows = one step per epoch (batch 4): 3 steps cross 2 epoch boundaries
    cfg = load_config("configs/tiny.yaml", [f"out_dir={tmp_path}", f"name={name}", "teacher.train_users=1",
                                            "teacher.max_steps=3", "teacher.eval_users=4", "teacher.lr=0.01",
                                            f"teacher.refresh_item_vectors={str(refresh).lower()}"])
    train_teacher(cfg)
    folder = tmp_path / name / "teacher"
    return cfg, load_file(str(folder / "heads.safetensors"))["item_vectors"], json.loads((folder / "metrics.json").read_text())


def test_item_vectors_are_reread_by_the_tuned_lm_at_each_epoch_boundary(tmp_path):
    from distill.data import Split, load_dataset
    from distill.teacher import compute_item_vectors
    cfg, fixed, m_fixed = _train_tiny(tmp_path, "fixed", refresh=False)
    _, tuned, m_tuned = _train_tiny(tmp_path, "tuned", refresh=True)
    assert m_fixed["budget"]["item_vector_refreshes"] == 0
    assert m_tuned["budget"]["item_vector_refreshes"] == 2
    # without refresh the vectors are exactly the base LM's; with it they moved with the LoRA weights
    ds = load_dataset(cfg.data)
    Split.leave_last_out(ds)
    backbone, tok = load_base(cfg.teacher, seed=cfg.seed)
    builder = SequenceBuilder(tok, ds.item_text, cfg.teacher.max_item_tokens, ds.has_ratings)
    base = compute_item_vectors(backbone, builder, cfg.teacher.infer_batch_tokens, "cpu")
    torch.testing.assert_close(fixed, base)
    assert (tuned - base).abs().max() > 1e-3
    assert tuned.shape == base.shape and torch.isfinite(tuned).all()


def test_teacher_dwa_adapts_every_n_steps(tmp_path):
    """The CPU-budget teacher never finishes an epoch, so DWA closes a period every `adapt_every` steps: the
    weights leave the base weights after two periods and follow the logged period-mean losses."""
    import json
    import math

    from distill.config import load_config
    from distill.teacher_stage import train_teacher
    cfg = load_config("configs/tiny.yaml", [f"out_dir={tmp_path}", "name=dwa", "teacher.weighting=dwa",
                                            "teacher.adapt_every=2", "teacher.max_steps=6", "teacher.eval_users=4",
                                            "teacher.refresh_item_vectors=false"])
    train_teacher(cfg)
    log = [json.loads(x) for x in (tmp_path / "dwa" / "teacher" / "train_log.jsonl").read_text().splitlines()]
    base = cfg.teacher.loss_weights
    for rec in log[:4]:  # steps 1-4: periods 1 and 2 still filling
        assert rec["weights"] == {t: base[t] for t in rec["weights"]}
    mean = lambda a, b, t: (log[a]["losses"][t] + log[b]["losses"][t]) / 2  # noqa: E731
    ratio = {t: mean(2, 3, t) / mean(0, 1, t) for t in base}
    z = sum(math.exp(r / 2.0) for r in ratio.values())
    for t in base:  # step 5 uses weights from periods (1, 2) = steps (1-2, 3-4)
        assert log[4]["weights"][t] == pytest.approx(base[t] * 3 * math.exp(ratio[t] / 2.0) / z, rel=1e-5)


# ----------------------------------------------------------------------------- the stage's time budget
def test_budget_plan_gives_training_what_is_left():
    from distill.budget import BudgetPlan
    plan = BudgetPlan(budget_s=60.0, spent_s=10.0, after_tokens=1000, tokens_per_s=50.0)
    assert (plan.after_s, plan.train_s, plan.over_s) == (20.0, 30.0, 0.0)
    assert "60 s = 10.0 s spent" in plan.describe() and "30.0 s training" in plan.describe()
    slow = BudgetPlan(budget_s=60.0, spent_s=10.0, after_tokens=1000, tokens_per_s=10.0)  # evaluation alone: 100 s
    assert (slow.after_s, slow.train_s, slow.over_s) == (100.0, 0.0, 50.0)
    said = slow.describe("lower eval_users")
    assert "exceeds the budget by ~50 s" in said and said.endswith("lower eval_users")
    assert slow.as_dict()["train_s"] == 0.0 and slow.as_dict()["after_tokens"] == 1000


def test_stage_clock_and_throughput_probe_use_the_injected_clock():
    from distill.budget import StageClock, forward_throughput
    ticks = iter([100.0, 103.5])
    assert StageClock(lambda: next(ticks)).elapsed() == 3.5

    class Fake(torch.nn.Module):
        def hidden(self, ids, mask):
            self.seen = mask.sum().item()
            return torch.zeros(*ids.shape, 4)

    t = iter([0.0, 2.0, 10.0, 10.5])  # first run 2 s (warm-up), second 0.5 s: the faster counts
    fake = Fake().train()
    tps = forward_throughput(fake, [[1] * 7, [1] * 3, [1] * 5], 0, budget_tokens=100, device="cpu", clock=lambda: next(t))
    assert fake.seen == 15 and tps == 15 / 0.5 and fake.training  # real tokens only; training mode restored


def test_teacher_time_budget_bounds_the_whole_stage(tmp_path, monkeypatch, capsys):
    """A throughput so low that the final evaluation alone exceeds the budget: the stage says so before training and
    trains a single step (the budget once covered training only, and evaluation came on top)."""
    import json

    import distill.teacher_stage as ts
    from distill.config import load_config
    monkeypatch.setattr(ts, "forward_throughput", lambda *a, **k: 1.0)  # 1 token/s: evaluation ~ thousands of s
    cfg = load_config("configs/tiny.yaml", [f"out_dir={tmp_path}", "name=b", "teacher.max_steps=3",
                                            "teacher.time_budget_s=60", "teacher.eval_users=4",
                                            "teacher.refresh_item_vectors=false"])
    rep = ts.train_teacher(cfg)
    out = capsys.readouterr().out
    b = rep["budget"]
    plan = b["plan"]
    assert (b["steps"], b["stop_reason"]) == (1, "time_budget")
    assert plan["after_tokens"] == rep["cost"]["eval_tokens"]  # the estimate counts exactly the tokens evaluated
    assert plan["tokens_per_s"] == 1.0 and plan["after_s"] == rep["cost"]["eval_tokens"] and plan["train_s"] == 0.0
    assert plan["over_s"] == pytest.approx(plan["spent_s"] + plan["after_s"] - 60, abs=0.01)
    assert "exceeds the budget" in out and "teacher.eval_users" in out
    assert json.loads((tmp_path / "b" / "teacher" / "metrics.json").read_text())["budget"]["plan"] == plan
