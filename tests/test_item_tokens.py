"""The soft-item-token teacher (teacher.input='item_tokens', teacher.layers): layout, input embeddings,
one-pass causality, truncation, save/load, and the trained-teacher manifest (init_from / ship-teacher)."""
import json

import numpy as np
import pytest
import torch
from onepass import assert_one_pass_equals_prefixes

from distill.config import TeacherConfig, load_config
from distill.teacher import (ByteTokenizer, ItemTokenBuilder, Teacher, TeacherHeads, add_lora, build_item_token_input,
                             load_base, make_builder, pad_batch, truncate_layers)

TINY = TeacherConfig(model="tiny-random", lora_last_layers=None, head_dim=16, lora_dropout=0.0, input="item_tokens",
                     tiny=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=4096))
TITLES = ["Alpha", "Beta", "Gamma", "Delta", "Epsilon"]


def test_layout_two_tokens_per_interaction_and_reads_the_right_positions():
    tok = ByteTokenizer()
    b = ItemTokenBuilder(tok, n_items=5, vocab=tok.vocab_size, has_ratings=True)
    enc = b.encode(np.array([2, 0, 4]), np.array([5.0, 3.0, 1.0]))
    V = tok.vocab_size
    assert enc.ids[len(b.prefix):] == [V + 2, V + 5 + 5, V + 0, V + 5 + 3, V + 4, V + 5 + 1]
    assert [enc.ids[i] for i in enc.item_end] == [V + 2, V + 0, V + 4]  # rating/like read AT the item token
    assert enc.before == [len(b.prefix) - 1, len(b.prefix) + 1, len(b.prefix) + 3]  # after the previous rating
    # without ratings: one token per interaction, next_item reads the previous item's token
    nb = ItemTokenBuilder(tok, 5, V, has_ratings=False)
    e2 = nb.encode(np.array([1, 3]), None)
    assert e2.ids[len(nb.prefix):] == [V + 1, V + 3] and e2.before[1] == e2.item_end[0]
    # tokens per interaction: 2 here vs >= 6 for the shortest title as text (" Beta:" + "3\n")
    assert b.dataset_tokens(np.arange(5), np.full(5, 4.0)) == len(b.prefix) + 10


def test_input_embeddings_start_at_title_means_and_digit_tokens():
    backbone, tok = load_base(TINY)
    vecs = torch.randn(5, 64)
    inputs = build_item_token_input(backbone, tok, TITLES, 8, vecs)
    w = backbone.get_input_embeddings().weight.detach()
    V = w.shape[0]
    ids = torch.tensor([[1, 40, V + 3, V + 5 + 4, V + 0]])
    out = inputs(ids, backbone.get_input_embeddings())
    torch.testing.assert_close(out[0, 0], w[1])
    torch.testing.assert_close(out[0, 1], w[40])
    torch.testing.assert_close(out[0, 2], w[torch.tensor(tok.encode(" Delta"))].mean(0))  # item 3 = its title mean
    torch.testing.assert_close(out[0, 3], w[tok.encode("4")[0]])
    # the learned parts move the item token: ID embedding and text projection
    with torch.no_grad():
        inputs.item_emb.weight[0] += 1.0
        inputs.proj.bias += 0.5
    torch.testing.assert_close(inputs(ids, backbone.get_input_embeddings())[0, 4],
                               w[torch.tensor(tok.encode(" Alpha"))].mean(0) + 1.5)


def _tiny_item_teacher(seed=0, layers=None):
    tc = TINY if layers is None else TeacherConfig(**{**TINY.__dict__, "layers": layers})
    backbone, tok = load_base(tc, seed=seed)
    inputs = build_item_token_input(backbone, tok, TITLES, 8, torch.randn(5, 64))
    backbone = truncate_layers(backbone, tc.layers)
    torch.manual_seed(seed)
    backbone = add_lora(backbone, tc, init_lora_weights=False)
    heads = TeacherHeads(64, 16, torch.randn(5, 64), ["next_item", "rating", "like"])
    with torch.no_grad():
        for prm in list(heads.parameters()) + list(inputs.parameters()):
            prm.normal_(0, 0.2)
    return Teacher(backbone, heads, inputs).eval(), make_builder(tc, tok, TITLES, True, inputs.vocab)


def test_one_pass_equals_reading_each_prefix_alone_with_item_tokens():
    teacher, b = _tiny_item_teacher()
    items, ratings = np.array([1, 3, 0, 4]), np.array([4.0, 2.0, 5.0, 1.0])
    h = assert_one_pass_equals_prefixes(teacher, b, items, ratings)
    full = b.encode(items, ratings)
    with torch.no_grad():  # and padding a shorter row in a batch does not change its states
        ids, mask = pad_batch([full.ids, full.ids[:7]], b.pad_id)
        hb = teacher.hidden(ids, mask)
        torch.testing.assert_close(hb[1, :7], h[:7], atol=1e-5, rtol=1e-5)


def test_truncate_layers_keeps_the_first_n():
    backbone, _ = load_base(TINY)
    first = [p.clone() for p in backbone.layers[0].parameters()]
    cut = truncate_layers(backbone, 2)
    assert len(cut.layers) == 2 and cut.config.num_hidden_layers == 2
    for a, b in zip(first, cut.layers[0].parameters()):
        assert torch.equal(a, b)
    assert len(truncate_layers(load_base(TINY)[0], None).layers) == 3
    with pytest.raises(ValueError, match="teacher.layers"):
        truncate_layers(load_base(TINY)[0], 0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny item-token teacher trained through the CLI's teacher stage (so it has a manifest)."""
    from distillrec.cli import main
    tmp = tmp_path_factory.mktemp("itok")
    ov = [f"out_dir={tmp}", "name=src", "teacher.input=item_tokens", "teacher.layers=1", "teacher.max_steps=3",
          "teacher.eval_users=16"]
    assert main(["run", "--config", "configs/tiny.yaml", "--to-stage", "teacher"] + sum([["-o", o] for o in ov], [])) == 0
    return tmp, ov


def test_saved_item_token_teacher_reloads_to_the_same_outputs(trained):
    from distill.data import Split, load_dataset
    from distill.teacher import load_teacher, teacher_builder
    from distill.teacher_eval import teacher_predict
    tmp, ov = trained
    cfg = load_config("configs/tiny.yaml", ov)
    ds = load_dataset(cfg.data)
    split = Split.leave_last_out(ds)
    teacher, tok, meta = load_teacher(tmp / "src" / "teacher", merge=False)
    assert len(teacher.backbone.base_model.model.layers) == 1 and meta["vocab"] == ByteTokenizer.vocab_size
    builder = teacher_builder(teacher, cfg.teacher, tok, ds.item_text, ds.has_ratings)
    saved = np.load(tmp / "src" / "teacher" / "test_predictions.npz")
    pred = teacher_predict(teacher, builder, split, saved["users"], "test", cfg.teacher.eval_history, 10 ** 6, "cpu")
    np.testing.assert_allclose(pred["scores"], saved["scores"], atol=1e-4)
    np.testing.assert_allclose(pred["rating"], saved["rating"], atol=1e-5)
    # the inputs file does not repeat the heads' item vectors
    from safetensors.torch import load_file
    assert "item_vectors" not in load_file(str(tmp / "src" / "teacher" / "inputs.safetensors"))


def test_manifest_records_what_shapes_the_weights(trained):
    tmp, _ = trained
    man = json.loads((tmp / "src" / "teacher" / "manifest.json").read_text())
    assert man["shape"]["input"] == "item_tokens" and man["shape"]["layers"] == 1
    assert len(man["base_model"]["sha256_16"]) == 16 and len(man["data"]["data_hash"]) == 16
    assert man["wall_seconds"] > 0 and "NDCG@10" in man["test_metrics"]["next_item"]


def test_init_from_loads_evaluates_and_checks_the_manifest(trained):
    from distillrec.cli import main
    from distill.shipped import TeacherMismatchError, check_manifest
    tmp, ov = trained
    src = tmp / "src" / "teacher"
    ov2 = [o.replace("name=src", "name=dst") for o in ov] + [f"teacher.init_from={src}", "teacher.eval_users=24"]
    assert main(["run", "--config", "configs/tiny.yaml", "--to-stage", "cache"] + sum([["-o", o] for o in ov2], [])) == 0
    dst = tmp / "dst" / "teacher"
    rep = json.loads((dst / "metrics.json").read_text())
    assert rep["eval_users"] == 24 and rep["source"]["folder"] == str(src)  # evaluated here, on this run's users
    assert (tmp / "dst" / "teacher_cache" / "manifest.json").exists()
    # the same weights as the source: the 16 users the source evaluated score the same
    a, b = np.load(src / "test_predictions.npz"), np.load(dst / "test_predictions.npz")
    common = np.intersect1d(a["users"], b["users"])
    assert len(common) > 0
    ia, ib = np.searchsorted(a["users"], common), np.searchsorted(b["users"], common)
    np.testing.assert_allclose(a["scores"][ia], b["scores"][ib], atol=1e-4)
    # a field that shapes the network differs -> a clear error that says what and how to retrain
    cfg = load_config("configs/tiny.yaml", ov2 + ["teacher.lora_r=4"])
    from distill.data import load_dataset
    h = load_dataset(cfg.data).data_hash
    with pytest.raises(TeacherMismatchError, match=r"teacher.lora_r: teacher has 8, this config has 4(.|\n)*init_from=null"):
        check_manifest(src, cfg, h)
    with pytest.raises(TeacherMismatchError, match="data"):
        check_manifest(src, load_config("configs/tiny.yaml", ov2), "0" * 16)
    # unrelated fields (budgets, lr, eval sizes) do not matter
    check_manifest(src, load_config("configs/tiny.yaml", ov2 + ["teacher.lr=0.5", "teacher.max_steps=99"]), h)


def test_ship_teacher_copies_the_artifacts_only(trained, tmp_path):
    from distill.shipped import FILES, ship_teacher
    tmp, _ = trained
    dest = ship_teacher(tmp / "src", tmp_path / "shipped")
    have = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    assert have == ({f for f in FILES if (tmp / "src" / "teacher" / f).exists()} | {"SHIPPED"})
    assert not (dest / "checkpoint").exists() and not (dest / "test_predictions.npz").exists()


def test_teacher_config_rejects_unknown_input_and_bad_layers():
    with pytest.raises(ValueError, match="teacher.input='item_token'"):
        TeacherConfig(input="item_token")  # a typo must not fall back to the text formulation
    with pytest.raises(ValueError, match="teacher.layers"):
        TeacherConfig(layers=0)
    with pytest.raises(ValueError, match="teacher.init_from"):
        load_config("configs/tiny.yaml", ["teacher.init_from=3"])
    assert TeacherConfig(input="item_tokens", layers=8).layers == 8
