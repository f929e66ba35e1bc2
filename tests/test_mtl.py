"""MTL blocks (shared-bottom, MMoE, PLE): expert and gate counts, gate normalisation, which experts each
task can reach, and every tower's output shape in the student."""
import pytest
import torch

from distill.config import StudentConfig
from distill.mtl import MMoE, PLE, SharedBottom, build_mtl
from distill.student import Student

TASKS = ["next_item", "rating", "like"]
D, HIDDEN = 16, 24


def _z(seed=0, shape=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, D, generator=g)


@pytest.mark.parametrize("kind", ["shared_bottom", "mmoe", "ple"])
def test_every_task_gets_an_input_of_the_state_shape(kind):
    torch.manual_seed(0)
    block = build_mtl(kind, TASKS, D, HIDDEN, 0.0, n_experts=3, n_shared_experts=2).eval()
    out = block(_z())
    assert list(out) == TASKS
    for t in TASKS:
        assert out[t].shape == (3, 5, D)
        assert torch.isfinite(out[t]).all()


def test_unknown_block_is_rejected():
    with pytest.raises(ValueError, match="unknown student.mtl"):
        build_mtl("cross_stitch", TASKS, D, HIDDEN, 0.0, 2)


def test_shared_bottom_has_no_gates_and_one_output():
    block = SharedBottom(TASKS, D, HIDDEN)
    out = block(_z())
    assert out["next_item"] is out["rating"] is out["like"]
    assert block.gate_weights(_z()) == {}


def test_mmoe_counts_and_softmax_gates():
    block = MMoE(TASKS, D, HIDDEN, n_experts=5).eval()
    assert len(block.experts) == 5
    assert set(block.gates) == set(TASKS)
    assert all(block.gates[t].out_features == 5 for t in TASKS)
    for g in block.gate_weights(_z()).values():
        assert g.shape == (3, 5, 5)
        assert (g >= 0).all() and torch.allclose(g.sum(-1), torch.ones(3, 5), atol=1e-6)


def test_mmoe_gate_selects_the_expert_it_points_at():
    torch.manual_seed(1)
    block = MMoE(TASKS, D, HIDDEN, n_experts=4).eval()
    with torch.no_grad():
        for t, k in zip(TASKS, (0, 2, 3)):  # a one-hot gate on expert k
            block.gates[t].weight.zero_()
            block.gates[t].bias.fill_(-50.0)
            block.gates[t].bias[k] = 50.0
    z = _z()
    out = block(z)
    for t, k in zip(TASKS, (0, 2, 3)):
        assert torch.allclose(out[t], z + block.experts[k](z), atol=1e-5)


@pytest.mark.parametrize("n_task,n_shared", [(3, 2), (1, 4), (2, 0)])
def test_ple_counts_and_gate_widths(n_task, n_shared):
    block = PLE(TASKS, D, HIDDEN, n_experts=n_task, n_shared_experts=n_shared).eval()
    (level,) = block.levels
    assert len(level.shared) == n_shared
    assert set(level.specific) == set(TASKS)
    assert all(len(level.specific[t]) == n_task for t in TASKS)
    # the common bug: a task gate over every expert of every task (3 * n_task + n_shared)
    assert all(level.gates[t].out_features == n_task + n_shared for t in TASKS)
    assert level.shared_gate is None  # single level: nothing reads a shared output
    for g in block.gate_weights(_z()).values():
        assert g.shape == (3, 5, n_task + n_shared)
        assert (g >= 0).all() and torch.allclose(g.sum(-1), torch.ones(3, 5), atol=1e-6)


def test_ple_two_levels_have_a_shared_gate_over_all_experts_below_the_top():
    block = PLE(TASKS, D, HIDDEN, n_experts=2, n_shared_experts=3, levels=2).eval()
    assert len(block.levels) == 2
    assert block.levels[0].shared_gate.out_features == len(TASKS) * 2 + 3
    assert block.levels[1].shared_gate is None
    assert all(block.levels[1].gates[t].out_features == 2 + 3 for t in TASKS)
    out = block(_z())
    assert all(out[t].shape == (3, 5, D) for t in TASKS)


def test_ple_shared_experts_run_once_per_forward_and_task_experts_once():
    block = PLE(TASKS, D, HIDDEN, n_experts=2, n_shared_experts=3).eval()
    calls = {}

    def hook(name):
        def f(*_):
            calls[name] = calls.get(name, 0) + 1
        return f

    level = block.levels[0]
    for i, ex in enumerate(level.shared):
        ex.register_forward_hook(hook(f"shared{i}"))
    for t in TASKS:
        for i, ex in enumerate(level.specific[t]):
            ex.register_forward_hook(hook(f"{t}{i}"))
    block(_z())
    assert calls == {**{f"shared{i}": 1 for i in range(3)}, **{f"{t}{i}": 1 for t in TASKS for i in range(2)}}


def test_ple_task_reaches_only_its_own_and_the_shared_experts():
    torch.manual_seed(2)
    block = PLE(TASKS, D, HIDDEN, n_experts=2, n_shared_experts=2).eval()
    z = _z()
    before = block(z)
    with torch.no_grad():  # perturb one of `rating`'s own experts
        block.levels[0].specific["rating"][1][-1].bias.add_(1.0)
    after = block(z)
    assert not torch.allclose(after["rating"], before["rating"])
    assert torch.equal(after["next_item"], before["next_item"]) and torch.equal(after["like"], before["like"])
    with torch.no_grad():  # a shared expert reaches every task
        block.levels[0].shared[0][-1].bias.add_(1.0)
    again = block(z)
    assert all(not torch.allclose(again[t], after[t]) for t in TASKS)


def test_ple_gate_order_is_own_experts_then_shared():
    torch.manual_seed(3)
    block = PLE(TASKS, D, HIDDEN, n_experts=2, n_shared_experts=2).eval()
    level = block.levels[0]
    with torch.no_grad():
        for t in TASKS:
            level.gates[t].weight.zero_()
            level.gates[t].bias.fill_(-50.0)
        level.gates["next_item"].bias[1] = 50.0  # own expert 1
        level.gates["rating"].bias[2] = 50.0  # shared expert 0
        level.gates["like"].bias[3] = 50.0  # shared expert 1
    z = _z()
    out = block(z)
    assert torch.allclose(out["next_item"], z + level.specific["next_item"][1](z), atol=1e-5)
    assert torch.allclose(out["rating"], z + level.shared[0](z), atol=1e-5)
    assert torch.allclose(out["like"], z + level.shared[1](z), atol=1e-5)


@pytest.mark.parametrize("kind", ["shared_bottom", "mmoe", "ple"])
def test_student_tower_shapes_for_every_block(kind):
    torch.manual_seed(0)
    n_items, B, L, C = 30, 4, 7, 5
    cfg = StudentConfig(dim=D, layers=1, heads=2, max_len=10, tower_hidden=HIDDEN, mtl=kind, n_experts=3,
                        n_shared_experts=2)
    m = Student(cfg, n_items, TASKS, text_vectors=torch.randn(n_items, 12)).eval()
    if kind == "ple":
        assert len(m.mtl.levels[0].shared) == 2 and all(len(m.mtl.levels[0].specific[t]) == 3 for t in TASKS)
    if kind == "mmoe":
        assert len(m.mtl.experts) == 3
    items = torch.randint(0, n_items, (B, L))
    ratings = torch.randint(1, 6, (B, L)).float()
    length = torch.tensor([0, 1, 4, 7])
    out = m(items, ratings, length, torch.randint(0, n_items, (B, C)))
    assert out["next_item"].shape == (B, n_items)
    assert out["rating"].shape == (B, C) and out["like"].shape == (B, C)
    assert out["user_vector"].shape == (B, D)
    pos = m.forward_positions(items, ratings, length)
    assert pos["next_item"].shape == (B, L, n_items)
    assert pos["rating"].shape == (B, L, 1) and pos["like"].shape == (B, L, 1)
    assert pos["state"].shape == (B, L, D)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_student_without_rating_has_only_the_next_item_tower():
    m = Student(StudentConfig(dim=D, layers=1, heads=2, max_len=6, mtl="ple"), 9, ["next_item"]).eval()
    out = m(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.tensor([1, 3]), torch.zeros(2, 1).long())
    assert set(out) == {"next_item", "user_vector"}
    assert list(m.mtl.levels[0].gates) == ["next_item"]
