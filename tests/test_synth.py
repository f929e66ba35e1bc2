"""distillrec synth: seeded synthetic logs with power-law popularity, sequential structure, ratings and titles."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distill.synth import SynthError, SynthSpec, generate, history_lengths, items_path_for, write_synth

ROOT = Path(__file__).resolve().parents[1]
SPEC = SynthSpec(users=400, items=300, interactions=12_000, seed=3, topics=12)


def _same_user(g):
    return g["user"][1:] == g["user"][:-1]


def test_the_same_spec_gives_the_same_log_and_another_seed_another():
    a, b = generate(SPEC), generate(SPEC)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = generate(SynthSpec(**{**SPEC.__dict__, "seed": 4}))
    assert not np.array_equal(a["item"], c["item"])


def test_lengths_sum_exactly_and_respect_the_minimum():
    lengths = history_lengths(SPEC, np.random.default_rng(0))
    assert lengths.sum() == SPEC.interactions and lengths.min() >= SPEC.min_history and lengths.size == SPEC.users
    assert lengths.max() > 5 * np.median(lengths)  # a heavy tail of active users
    g = generate(SPEC)  # the log's per-user counts are the lengths drawn first from the spec's seed
    assert g["item"].size == SPEC.interactions
    assert np.array_equal(np.bincount(g["user"]), history_lengths(SPEC, np.random.default_rng(SPEC.seed)))
    assert np.all(np.diff(g["user"]) >= 0)  # users in order, each user's rows together


def test_popularity_is_a_power_law_and_sequences_follow_topics():
    g = generate(SPEC)
    counts = np.sort(np.bincount(g["item"], minlength=SPEC.items))[::-1]
    top = counts[:SPEC.items // 10].sum() / counts.sum()
    assert top > 0.3  # the top 10 % of items take far more than 10 % of the interactions
    topic = g["topic_of"][g["item"]]
    same = _same_user(g)
    stay_rate = (topic[1:] == topic[:-1])[same].mean()
    flat = generate(SynthSpec(**{**SPEC.__dict__, "stay": 0.0}))
    t2 = flat["topic_of"][flat["item"]]
    flat_rate = (t2[1:] == t2[:-1])[_same_user(flat)].mean()
    assert stay_rate > SPEC.stay and stay_rate > flat_rate + 0.4  # the sequential signal is the stay parameter's


def test_ratings_and_timestamps():
    g = generate(SPEC)
    assert g["rating"].min() >= 1 and g["rating"].max() <= 5 and len(np.unique(g["rating"])) == 5
    assert np.all(np.diff(g["timestamp"])[_same_user(g)] > 0)  # chronological per user


def test_written_files_load_through_the_data_stage(tmp_path):
    from distill.config import DataConfig
    from distill.data import load_dataset
    out = tmp_path / "log.parquet"
    summary = write_synth(SPEC, out)
    assert Path(summary["items"]) == items_path_for(out) == tmp_path / "log.items.parquet"
    ds = load_dataset(DataConfig(**summary["data_config"]))
    assert (ds.n_users, ds.n_items) == (SPEC.users, summary["items_drawn"])
    assert sum(len(s) for s in ds.items) == SPEC.interactions and ds.has_ratings
    assert ds.item_text_coverage["coverage"] == 1.0
    g = generate(SPEC)
    topic = {str(i): t for i, t in enumerate(g["topic_of"])}
    words = {}
    for iid, text in zip(ds.item_ids, ds.item_text):  # items of one topic share their title words
        words.setdefault(topic[str(iid)], set()).add(" ".join(text.split()[:2]))
    assert all(len(w) == 1 for w in words.values())
    with pytest.raises(SynthError, match="exists"):
        write_synth(SPEC, out)


def test_bad_specs_are_clear_errors():
    with pytest.raises(SynthError, match="fewer than users x min_history"):
        SynthSpec(users=100, items=10, interactions=200)
    with pytest.raises(SynthError, match="topics=50 exceeds items=10"):
        SynthSpec(users=10, items=10, interactions=100)
    with pytest.raises(SynthError, match="must be a positive integer"):
        SynthSpec(users=0, items=10, interactions=100)
    with pytest.raises(SynthError, match=".parquet"):
        write_synth(SynthSpec(users=10, items=20, interactions=100, topics=2), "/tmp/x.csv")


def test_the_cli_writes_the_files(tmp_path):
    p = subprocess.run([sys.executable, "-m", "distillrec", "synth", "--users", "50", "--items", "40",
                        "--interactions", "500", "--topics", "4", str(tmp_path / "s.parquet")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "s.parquet").is_file() and (tmp_path / "s.items.parquet").is_file()
    bad = subprocess.run([sys.executable, "-m", "distillrec", "synth", "--users", "50", "--items", "40",
                          "--interactions", "10", str(tmp_path / "t.parquet")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "fewer than users x min_history" in bad.stderr
