"""Teacher cache: contents follow the contract, and a missing / stale / corrupt cache names the stage to run."""
import numpy as np
import pytest

from distill.cache import StaleCacheError, build_cache, load_cache
from distill.config import load_config
from distill.teacher_stage import train_teacher


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    cfg = load_config("configs/tiny.yaml", [f"out_dir={out}", "name=c", "teacher.max_steps=2", "teacher.cache_users=5"])
    train_teacher(cfg)
    build_cache(cfg)
    return cfg


def test_cache_contract(run):
    from distill.data import load_dataset
    ds = load_dataset(run.data)
    c = load_cache(run.run_dir, ds.data_hash)
    R, K = c["next_topk_items"].shape
    assert K == 50 and R == c["offsets"][-1] and len(c["users"]) == 5
    # the cached user vectors rebuild the teacher's full-catalog logits; top-K agrees with them
    full = c["user_vector"].astype(np.float32) @ c["item_table"].T + c["item_bias"]
    top = np.take_along_axis(full, c["next_topk_items"].astype(np.int64), axis=1)
    np.testing.assert_allclose(top, c["next_topk_logits"].astype(np.float32), atol=0.05, rtol=0.01)
    assert (full.max(1) <= c["next_topk_logits"][:, 0].astype(np.float32) + 0.05).all()
    assert c["item_vectors"].shape[0] == ds.n_items
    assert np.isfinite(c["rating"]).all() and np.isfinite(c["like_logit"]).all()


def test_missing_cache_names_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="distillrec cache"):
        load_cache(tmp_path, "x")


def test_stale_data_and_teacher_are_detected(run, tmp_path):
    import shutil
    from distill.data import load_dataset
    ds = load_dataset(run.data)
    with pytest.raises(StaleCacheError, match="distillrec teacher"):
        load_cache(run.run_dir, "another-hash")
    copy = tmp_path / "copy"
    shutil.copytree(run.run_dir, copy)
    heads = copy / "teacher" / "heads.safetensors"
    heads.write_bytes(heads.read_bytes()[:-8] + b"\x00" * 8)  # the teacher changed after caching
    with pytest.raises(StaleCacheError, match="stale.*distillrec cache"):
        load_cache(copy, ds.data_hash)


def test_corrupt_cache_file_is_a_clear_error(run, tmp_path):
    import shutil
    from distill.data import load_dataset
    ds = load_dataset(run.data)
    copy = tmp_path / "copy"
    shutil.copytree(run.run_dir, copy)
    f = copy / "teacher_cache" / "shards" / "00000" / "next_topk_items.npy"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(StaleCacheError, match="shards/00000.*corrupt.*distillrec cache"):
        load_cache(copy, ds.data_hash)
    (copy / "teacher_cache" / "items.npz").write_bytes(b"garbage")
    shutil.rmtree(copy / "teacher_cache" / "shards" / "00000")
    with pytest.raises(StaleCacheError, match="missing or corrupt"):
        load_cache(copy, ds.data_hash)


def test_cache_states_the_labelling_cost_up_front(run, capsys):
    """The cache has no time budget: it must label every position, so it states the cost before it starts, from
    the exact token count and the teacher stage's measured evaluation throughput."""
    import json
    import shutil
    from pathlib import Path
    shutil.rmtree(Path(run.run_dir) / "teacher_cache" / "shards")  # else the complete cache is reused (resume)
    man = build_cache(run)
    out = capsys.readouterr().out
    lab = man["labelling"]
    cost = json.loads((Path(run.run_dir) / "teacher" / "metrics.json").read_text())["cost"]
    tps = cost["eval_tokens"] / cost["eval_seconds"]
    assert lab["estimate_source"] == "the teacher's evaluation throughput"
    assert lab["estimated_seconds"] == round(lab["tokens"] / tps, 1)  # lab["tokens"]: what was really labelled
    assert f"labelling {man['rows']:,} positions of 5 users" in out and f"{lab['tokens']:,} LLM tokens" in out
    assert "0 of its 1 shard(s) already labelled, 1 to label" in out
    again = build_cache(run)  # complete and fresh: nothing is labelled again
    assert "1 of its 1 shard(s) already labelled, 0 to label" in capsys.readouterr().out
    assert again["labelling"]["shards_labelled_now"] == 0 and again["shards"] == man["shards"]


def test_artifacts_are_readable_by_other_users(run):
    """mkstemp makes 0600 files; artifacts get what a plain open() gives (0o666 & ~umask: 0644 under 022)."""
    import os
    import stat
    from pathlib import Path

    from distill.io import current_umask
    expected = 0o666 & ~current_umask()
    for f in ("teacher_cache/items.npz", "teacher_cache/shards/00000/next_topk_items.npy",
              "teacher_cache/shards/00000/meta.json", "teacher_cache/manifest.json", "teacher/heads.safetensors",
              "teacher/adapter/adapter_model.safetensors", "teacher/adapter/adapter_config.json",
              "teacher/metrics.json", "teacher/test_predictions.npz"):
        assert stat.S_IMODE(os.stat(Path(run.run_dir) / f).st_mode) == expected, f


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_writes_follow_the_umask_like_open(tmp_path, umask):
    import os
    import stat

    from distill.io import atomic_write_text, current_umask, write_json
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write_text(tmp_path / "new" / "a.txt", "x")
        write_json(tmp_path / "b.json", {"k": 1})
        with open(tmp_path / "plain.txt", "w") as f:  # the reference: what open() gives
            f.write("x")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "new" / "a.txt") == mode(tmp_path / "b.json") == mode(tmp_path / "plain.txt") == 0o666 & ~umask
    assert mode(tmp_path / "new") == 0o777 & ~umask  # folders: mkdir's usual mode
    assert not list(tmp_path.rglob(".*.tmp"))
