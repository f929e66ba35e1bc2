"""Bring your own teacher: any HF causal LM folder as teacher.model. Tiny RANDOM Llama, Qwen2 and GPT-2 folders
(save_pretrained + an offline byte-level tokenizer) are trained a few steps with both inputs, their LoRA targets
come from each model's own modules, truncation works on each layout, and save/load gives the same scores."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from distill.config import TeacherConfig, load_config
from distill.teacher import (TeacherModelError, add_lora, byte_tokenizer_hf, decoder_layers, load_base, lora_targets,
                             truncate_layers)

ARCHS = ("llama", "qwen2", "gpt2")
LAYER_PATH = {"llama": "layers", "qwen2": "layers", "gpt2": "h"}
FINAL_NORM = {"llama": "norm", "qwen2": "norm", "gpt2": "ln_f"}
PEFT_DEFAULT = {"llama": ["self_attn.q_proj", "self_attn.v_proj"], "qwen2": ["self_attn.q_proj", "self_attn.v_proj"],
                "gpt2": ["attn.c_attn"]}


def _config(arch: str):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config
    ids = dict(vocab_size=259, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=1024, **ids)
    cls = LlamaConfig if arch == "llama" else Qwen2Config
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=1024, **ids)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{arch: folder} of tiny random causal LMs written as a user would bring them: weights + tokenizer files."""
    from transformers import AutoModelForCausalLM
    root = tmp_path_factory.mktemp("byo")
    out = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        folder = root / arch
        AutoModelForCausalLM.from_config(_config(arch)).save_pretrained(folder)
        byte_tokenizer_hf().save_pretrained(folder)
        out[arch] = folder
    return out


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    """A seeded 20-user log over 30 titled items (csv + items file): small enough for a few-step run per model."""
    root = tmp_path_factory.mktemp("byo_log")
    rng = np.random.default_rng(0)
    rows = [(u, int(i), int(rng.integers(1, 6)), t) for u in range(20)
            for t, i in enumerate(rng.choice(30, size=10, replace=False))]
    pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]).to_csv(root / "log.csv", index=False)
    pd.DataFrame({"item_id": range(30), "title": [f"Film number {i} ({1980 + i})" for i in range(30)]}
                 ).to_csv(root / "items.csv", index=False)
    return root


def test_byte_tokenizer_hf_matches_the_offline_byte_tokenizer():
    from distill.teacher import ByteTokenizer
    text = " Toy Story (1995):4\n é"
    assert byte_tokenizer_hf()(text, add_special_tokens=False)["input_ids"] == ByteTokenizer().encode(text)


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_layers_and_lora_targets_come_from_the_model(folders, arch):
    backbone, _ = load_base(TeacherConfig(model=str(folders[arch])))
    path, layers = decoder_layers(backbone)
    assert path == LAYER_PATH[arch] and len(layers) == 3
    # peft's per-architecture default, restricted to the last 2 of 3 layers
    auto = lora_targets(backbone, ["auto"], 2)
    assert auto == [f"{path}.{i}.{name}" for i in (1, 2) for name in PEFT_DEFAULT[arch]]
    assert lora_targets(backbone, None, 2) == auto
    # a raw pattern over the paths, and every linear layer
    assert lora_targets(backbone, [rf"re:{path}\.0\..*"], None)[0].startswith(f"{path}.0.")
    every = lora_targets(backbone, ["all-linear"], 1)
    assert every and all(p.startswith(f"{path}.2.") for p in every)


def test_a_name_the_model_lacks_lists_the_names_it_has(folders):
    backbone, _ = load_base(TeacherConfig(model=str(folders["gpt2"])))
    with pytest.raises(TeacherModelError, match=r"\['q_proj', 'v_proj'\].*gpt2.*'attn\.c_attn'"):
        lora_targets(backbone, ["q_proj", "v_proj"], None)  # the Llama default, on GPT-2
    with pytest.raises(TeacherModelError, match="re:nothing"):
        lora_targets(backbone, ["re:nothing"], None)


@pytest.mark.parametrize("arch", ARCHS)
def test_add_lora_adapts_exactly_the_resolved_modules(folders, arch):
    cfg = TeacherConfig(model=str(folders[arch]), target_modules=["auto"], lora_last_layers=1)
    backbone, _ = load_base(cfg)
    model = add_lora(backbone, cfg)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    expected = sorted(f"base_model.model.{LAYER_PATH[arch]}.2.{name}.lora_{ab}.default.weight"
                      for name in PEFT_DEFAULT[arch] for ab in "AB")
    assert trainable == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_truncate_layers_keeps_the_first_n_of_each_layout(folders, arch):
    cfg = TeacherConfig(model=str(folders[arch]))
    full, _ = load_base(cfg)
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        states = full(input_ids=ids, output_hidden_states=True).hidden_states
        cut = truncate_layers(load_base(cfg)[0], 2)
        out = cut(input_ids=ids).last_hidden_state
        expected = getattr(full, FINAL_NORM[arch])(states[2])  # the state after layer 2, through the final norm
    assert len(decoder_layers(cut)[1]) == 2 and cut.config.num_hidden_layers == 2
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - full(input_ids=ids).last_hidden_state).abs().max() > 1e-3  # the third layer is really gone


def test_a_mistyped_folder_says_folder_not_found(tmp_path, monkeypatch):
    with pytest.raises(TeacherModelError, match="folder not found"):
        load_base(TeacherConfig(model=str(tmp_path / "my-teacher")))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TeacherModelError, match=r"teacher.model='./my-teahcer': folder not found"):
        load_base(TeacherConfig(model="./my-teahcer"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherModelError, match=r"config.json not found"):
        load_base(TeacherConfig(model=str(tmp_path / "empty")))
    with pytest.raises(TeacherModelError, match="no such local folder.*hub could not provide it"):
        load_base(TeacherConfig(model="nobody-here/no-such-model"))  # offline (conftest): not downloadable


def _train(folders, log, tmp_path, arch, input_):
    from distill.teacher_stage import train_teacher
    ov = [f"out_dir={tmp_path}", f"name={arch}-{input_}", "data.source=csv", f"data.path={log / 'log.csv'}",
          f"data.items_path={log / 'items.csv'}", f"teacher.model={folders[arch]}", "teacher.target_modules=[auto]",
          "teacher.lora_last_layers=2", f"teacher.input={input_}", "teacher.max_steps=4", "teacher.train_users=null",
          "teacher.eval_users=8", "teacher.head_dim=16", "teacher.lr=0.01", "teacher.lora_dropout=0.0",
          "teacher.time_budget_s=600", "teacher.window=4", "teacher.context=2"]
    cfg = load_config("configs/tiny.yaml", ov)
    train_teacher(cfg)
    return cfg, tmp_path / f"{arch}-{input_}" / "teacher"


@pytest.mark.parametrize("input_", ["text", "item_tokens"])
@pytest.mark.parametrize("arch", ARCHS)
def test_own_teacher_trains_predicts_and_round_trips(folders, log, tmp_path, arch, input_):
    from safetensors.torch import load_file

    from distill.data import Split, load_dataset
    from distill.teacher import load_teacher, saved_teacher_config, teacher_builder
    from distill.teacher_eval import teacher_predict
    cfg, out = _train(folders, log, tmp_path, arch, input_)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["budget"]["steps"] == 4
    steps = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(steps) == 4 and all(np.isfinite(v) for s in steps for v in s["losses"].values())
    # LoRA starts as the identity (B = 0): nonzero B on exactly peft's default targets means it trained
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert sorted(k.split(".lora_B")[0].replace("base_model.model.", "") for k in lora_b) == sorted(
        f"{LAYER_PATH[arch]}.{i}.{name}" for i in (1, 2) for name in PEFT_DEFAULT[arch])
    assert all(v.abs().max() > 0 for v in lora_b.values())
    # predictions: one row of catalog scores per evaluated user
    ds = load_dataset(cfg.data)
    with np.load(out / "test_predictions.npz") as z:
        users, scores, rating = z["users"], z["scores"], z["rating"]
    assert scores.shape == (8, ds.n_items) == (8, 30) and rating.shape == (8,) and np.isfinite(scores).all()
    # save -> load gives the same scores (unmerged exactly; merged up to float rounding)
    split = Split.leave_last_out(ds)
    for merge, tol in ((False, 1e-5), (True, 1e-4)):
        teacher, tok, meta = load_teacher(out, merge=merge)
        builder = teacher_builder(teacher, saved_teacher_config(meta), tok, ds.item_text, ds.has_ratings)
        again = teacher_predict(teacher, builder, split, users, "test", cfg.teacher.eval_history,
                                cfg.teacher.infer_batch_tokens, "cpu")
        np.testing.assert_allclose(again["scores"], scores, atol=tol, rtol=tol)
        np.testing.assert_allclose(again["rating"], rating, atol=tol, rtol=tol)
