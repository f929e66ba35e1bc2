"""Synthetic interaction logs at any scale (`distillrec synth`), seeded, with structure a model can learn.

    distillrec synth --users 100000 --items 20000 --interactions 10000000 runs/synth/log.parquet

writes two Parquet files that `data.source: parquet` reads as they are:

    log.parquet         user_id, item_id, rating (1..5), timestamp      one row per interaction
    log.items.parquet   item_id, title                                  data.items_path (data.item_text_cols: [title])

The generative model, chosen so that popularity, sequence and text baselines are all beatable but not trivial:
- **Items** fall into `topics` groups. Within a topic, popularity follows a power law (Zipf, exponent `zipf`):
  a few hits, a long tail, as in real catalogs.
- **Users** have a favourite topic and a history length drawn from a lognormal (heavy tail), scaled so the
  lengths sum to exactly `interactions` (each >= `min_history`).
- **Sequences** are a Markov chain over topics: the next interaction stays in the previous one's topic with
  probability `stay`, else jumps to the user's favourite topic (prob. 1/2) or a popular topic (prob. 1/2). The
  item within the topic is drawn by its popularity. So the recent history predicts the next item's topic (a
  sequential model learns it) while popularity alone does not.
- **Ratings** are 1..5: a user bias + an item quality + 1 when the item is in the user's favourite topic,
  plus noise, rounded and clipped.
- **Titles** are built from topic words ("<topic adjective> <topic noun> <item number>"): items of one topic share
  words, so an LLM's text vectors carry the topic (what a text projection can use for cold items).
- **Timestamps** increase along each user's sequence (seconds from an epoch of 2020-01-01).

The generator is vectorised over users (one loop over positions, not over interactions): 10^7 interactions take
seconds and their arrays, not Python objects, dominate memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

_ADJECTIVES = ("Silent", "Golden", "Broken", "Hidden", "Electric", "Frozen", "Wild", "Last", "Crimson", "Lost",
               "Midnight", "Iron", "Secret", "Burning", "Little", "Dark", "Bright", "Eternal", "Falling", "Savage")
_NOUNS = ("River", "Empire", "Garden", "Machine", "Kingdom", "Shadow", "Voyage", "Island", "Circus", "Harbor",
          "Planet", "Letter", "Mountain", "Station", "Orchestra", "Desert", "Window", "Engine", "Forest", "Carnival")


class SynthError(ValueError):
    """A synth parameter is out of range; the message names it and the valid range."""


@dataclass(frozen=True)
class SynthSpec:
    users: int
    """Number of users (each gets at least min_history interactions)."""
    items: int
    """Catalog size (items never drawn simply do not appear in the log)."""
    interactions: int
    """Total rows of the log: the user history lengths sum to exactly this."""
    seed: int = 0
    """Everything is drawn from numpy's default_rng(seed): the same spec writes the same files."""
    topics: int = 50
    """Item groups; sequences mostly stay within one."""
    zipf: float = 1.1
    """Power-law exponent of item popularity within a topic (1.0-1.2 is typical of real logs)."""
    stay: float = 0.7
    """Probability that the next interaction stays in the previous one's topic (the sequential signal)."""
    min_history: int = 3
    """Shortest history: the protocol needs >= 3 events per user (train, validation, test)."""
    length_sigma: float = 1.0
    """Spread of the lognormal history lengths (heavy tail: a few very active users)."""

    def __post_init__(self):
        for name in ("users", "items", "interactions", "topics", "min_history"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise SynthError(f"{name} must be a positive integer, got {v!r}")
        if self.interactions < self.users * self.min_history:
            raise SynthError(f"interactions={self.interactions:,} is fewer than users x min_history = "
                             f"{self.users:,} x {self.min_history}: raise --interactions or lower --users")
        if self.topics > self.items:
            raise SynthError(f"topics={self.topics} exceeds items={self.items}: every topic needs an item")
        if not 0.0 <= self.stay <= 1.0:
            raise SynthError(f"stay must lie in [0, 1], got {self.stay}")
        if not self.zipf > 0 or not self.length_sigma >= 0:
            raise SynthError(f"zipf must be > 0 and length_sigma >= 0, got {self.zipf}, {self.length_sigma}")


def history_lengths(spec: SynthSpec, rng: np.random.Generator) -> np.ndarray:
    """int64 [users]: lognormal lengths, each >= min_history, summing to exactly spec.interactions."""
    extra_total = spec.interactions - spec.users * spec.min_history
    w = rng.lognormal(0.0, spec.length_sigma, size=spec.users)
    extra = np.floor(w / w.sum() * extra_total).astype(np.int64)
    short = extra_total - int(extra.sum())  # rounding: hand the remainder to the heaviest users
    if short:
        extra[np.argsort(-w, kind="stable")[:short]] += 1
    return extra + spec.min_history


def item_topics(spec: SynthSpec, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """(topic of each item [items], items of each topic sorted by popularity rank, their cumulative probabilities)."""
    topic = rng.integers(0, spec.topics, size=spec.items)
    topic[:spec.topics] = np.arange(spec.topics)  # every topic has at least one item
    members, cdfs = [], []
    for t in range(spec.topics):
        ids = rng.permutation(np.flatnonzero(topic == t))  # a random item is the topic's hit
        p = 1.0 / np.arange(1, ids.size + 1) ** spec.zipf
        members.append(ids)
        cdfs.append(np.cumsum(p / p.sum()))
    return topic, members, cdfs


def _draw_items(topics_now: np.ndarray, members, cdfs, rng: np.random.Generator) -> np.ndarray:
    """One item per row from its topic's popularity (inverse-CDF sampling, grouped by topic)."""
    out = np.empty(topics_now.size, dtype=np.int64)
    u = rng.random(topics_now.size)
    order = np.argsort(topics_now, kind="stable")
    bounds = np.searchsorted(topics_now[order], np.arange(len(members) + 1))
    for t in range(len(members)):
        rows = order[bounds[t]:bounds[t + 1]]
        if rows.size:
            out[rows] = members[t][np.minimum(np.searchsorted(cdfs[t], u[rows]), members[t].size - 1)]
    return out


def generate(spec: SynthSpec) -> dict[str, np.ndarray]:
    """The log as arrays (user, item, rating, timestamp), users in order, each user's rows chronological."""
    rng = np.random.default_rng(spec.seed)
    lengths = history_lengths(spec, rng)
    topic_of, members, cdfs = item_topics(spec, rng)
    topic_pop = np.array([m.size for m in members], dtype=np.float64)
    topic_pop /= topic_pop.sum()
    favourite = rng.integers(0, spec.topics, size=spec.users)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    n = int(lengths.sum())
    item = np.empty(n, dtype=np.int64)
    current = favourite.copy()
    for pos in range(int(lengths.max())):
        live = np.flatnonzero(lengths > pos)  # users whose history reaches this position
        if pos:
            move = rng.random(live.size) >= spec.stay
            jump_fav = rng.random(live.size) < 0.5
            popular = rng.choice(spec.topics, size=live.size, p=topic_pop)
            current[live] = np.where(move, np.where(jump_fav, favourite[live], popular), current[live])
        item[starts[live] + pos] = _draw_items(current[live], members, cdfs, rng)
    user = np.repeat(np.arange(spec.users, dtype=np.int64), lengths)
    user_bias = rng.normal(0.0, 0.5, size=spec.users)
    quality = rng.normal(0.0, 0.7, size=spec.items)
    fav_match = (topic_of[item] == favourite[user]).astype(np.float64)
    score = 3.3 + user_bias[user] + quality[item] + fav_match + rng.normal(0.0, 0.6, size=n)
    rating = np.clip(np.rint(score), 1, 5).astype(np.int8)
    gaps = rng.integers(60, 86_400, size=n)  # one minute to one day between interactions
    t0 = 1_577_836_800  # 2020-01-01
    ts = np.cumsum(gaps)
    ts -= np.repeat(ts[starts] - gaps[starts], lengths)  # restart the clock per user
    ts += t0 + rng.integers(0, 365 * 86_400, size=spec.users)[user]
    return {"user": user, "item": item, "rating": rating, "timestamp": ts.astype(np.int64), "topic_of": topic_of}


def item_titles(topic_of: np.ndarray, seed: int) -> list[str]:
    """'<adjective> <noun> <n>': the adjective and noun come from the item's topic, so a topic's items share words."""
    rng = np.random.default_rng([seed, 17])
    adj = rng.integers(0, len(_ADJECTIVES), size=int(topic_of.max()) + 1)
    noun = rng.integers(0, len(_NOUNS), size=int(topic_of.max()) + 1)
    return [f"{_ADJECTIVES[adj[t]]} {_NOUNS[noun[t]]} {i}" for i, t in enumerate(topic_of.tolist())]


def items_path_for(out: Path) -> Path:
    """log.parquet -> log.items.parquet."""
    out = Path(out)
    return out.with_name(out.name[:-len(".parquet")] + ".items.parquet" if out.name.endswith(".parquet")
                         else out.name + ".items.parquet")


def write_synth(spec: SynthSpec, out, overwrite: bool = False) -> dict:
    """Generate and write the log + items Parquet files (atomically); returns a summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .io import atomic_path
    out = Path(out)
    if out.suffix != ".parquet":
        raise SynthError(f"the output must be a .parquet file, got {out}")
    items_out = items_path_for(out)
    for p in (out, items_out):
        if p.exists() and not overwrite:
            raise SynthError(f"{p} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    g = generate(spec)
    log = pa.table({"user_id": pa.array(g["user"]), "item_id": pa.array(g["item"]),
                    "rating": pa.array(g["rating"]), "timestamp": pa.array(g["timestamp"])})
    items = pa.table({"item_id": pa.array(np.arange(spec.items, dtype=np.int64)),
                      "title": pa.array(item_titles(g["topic_of"], spec.seed))})
    for table, path in ((log, out), (items, items_out)):
        with atomic_path(path) as tmp:
            pq.write_table(table, str(tmp))
    drawn = np.bincount(g["item"], minlength=spec.items)
    return {"log": str(out), "items": str(items_out), "users": spec.users, "items_in_catalog": spec.items,
            "items_drawn": int((drawn > 0).sum()), "interactions": int(g["item"].size),
            "top1pct_item_share": float(np.sort(drawn)[::-1][:max(1, spec.items // 100)].sum() / drawn.sum()),
            "data_config": {"source": "parquet", "path": str(out), "items_path": str(items_out),
                            "item_text_cols": ["title"]}}


def main_args(users: int, items: int, interactions: int, out: str, seed: int = 0, overwrite: bool = False,
              topics: Optional[int] = None) -> dict:
    """The CLI's entry point (distillrec synth)."""
    kw = {} if topics is None else {"topics": topics}
    return write_synth(SynthSpec(users=users, items=items, interactions=interactions, seed=seed, **kw), out,
                       overwrite=overwrite)
