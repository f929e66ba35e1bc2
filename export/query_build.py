"""The query encoder artifact (onnx/query/): free text -> a direction in the student's item space, distilled from the
teacher LLM's word predictions about each item.

What the LLM knows about an item, it says in the words it predicts after a descriptive prompt ("The movie Toy
Story (1995) is a" -> ' comedy', ' children', ' family' ...). For every item i and every token w of the vocabulary
the builder reads, in ONE forward per (item, template):

    PMI[i, w] = log p(w | prompt(i)) - log mean_j p(w | prompt(j))       (how much more likely w is for i)

averaged over the templates, and fits one vector per token in the student's item space by ridge regression on the
served item vectors V [N, d]:

    token_vectors[w] = argmin_e  || V e - PMI[:, w] ||^2 + lam ||e||^2   =  (V^T V + lam I)^-1 V^T PMI[:, w]

so that v_i . token_vectors[w] approximates PMI[i, w]. A query is the sum of its words' first-token rows
(export/query_encoder.py), normalised; the runtime adds it to the user vector: u' = u + weight * q_hat, which any
retriever (exact or ANN) serves unchanged. The whole [N, vocab] matrix is never held: V^T PMI is accumulated batch
by batch (V^T L minus (V^T 1) c^T, c = the per-token log-mean found with a running logsumexp), so memory is
O(d * vocab) whatever the catalog.

Why not the mean-pooled text vectors the item table is built from (distill/item_text.py)? For SmolLM2-135M their
cosine to a genre word's vector does not rank that genre's ML-100K items (mean ROC AUC 0.49-0.52 over 18 genres,
three phrasings), while the PMI of the genre word does (AUC 0.62-0.64): the LM's next-word predictions carry what it
knows about a title; its pooled hidden states mostly carry the title's surface form. docs/interactive.md has the
numbers.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .query_encoder import FORMAT, FORMAT_VERSION, META_FILE, TOKENIZER_FILE, VECTORS_FILE


@dataclass
class QueryBuildConfig:
    templates: Sequence[str] = (
        "The {domain} {text} is a",
        "<|im_start|>user\nWhat kind of {domain} is {text}?<|im_end|>\n<|im_start|>assistant\n{text} is a",
    )
    """Prompts whose next-token distribution describes an item ({text}: the item text, {domain}: `domain`). One
    plain sentence and one chat turn of the instruct model: on ML-100K genres their PMI ranks a genre's items at
    ROC AUC 0.62 and 0.63, their average at 0.64 (a chat template without the model's chat tokens is plain text,
    which any LM reads)."""
    domain: str = "movie"
    """What the items are, in one word ('movie', 'book', 'product'): the prompts name it."""
    ridge: float = 1e-3
    """Ridge strength relative to the mean eigenvalue of V^T V (trace / d): small, it only keeps the solve stable
    when item vectors are nearly collinear; 1e-4..1e-1 changed the genre AUC by < 0.002 on ML-100K."""
    batch_items: int = 64
    """Items per LM forward (left-padded prompts)."""
    max_text_tokens: int = 32
    """Item text cut to this many tokens inside a prompt (titles are ~8; long descriptions would dominate cost)."""
    weight: float = 1.0
    """Initial query weight w in u' = u + w q_hat; `distillrec query` replaces it with the one chosen on validation."""
    keep_tokens: Sequence[int] = field(default_factory=tuple)
    """Token ids whose PMI columns [N, k] are returned too (evaluation of the LLM without distillation)."""

    def __post_init__(self):
        if not self.templates or any("{text}" not in t for t in self.templates):
            raise ValueError("QueryBuildConfig.templates: every template needs a {text} placeholder")
        if not self.ridge > 0:
            raise ValueError(f"QueryBuildConfig.ridge must be > 0, got {self.ridge}")
        for name in ("batch_items", "max_text_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"QueryBuildConfig.{name} must be a positive int, got {v!r}")
        if not (np.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"QueryBuildConfig.weight must be finite and > 0, got {self.weight}")


def _cut(tok, text: str, n: int) -> str:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= n else tok.decode(ids[:n])


def _encode(tok, prompts: list[str]) -> list[list[int]]:
    return [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


def next_token_logprobs(lm, tok, prompts: list[str]):
    """log p(next token | prompt) [B, vocab] float64 numpy, prompts left-padded (the last position is real)."""
    from distill.teacher import pad_id
    return _next_token_logprobs(lm, _encode(tok, prompts), pad_id(tok))


def _next_token_logprobs(lm, ids: list[list[int]], pad: int):
    import torch
    width = max(len(i) for i in ids)
    x = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros_like(x)
    for r, row in enumerate(ids):
        x[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = lm(input_ids=x, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1]
    return torch.log_softmax(logits.double(), dim=-1).numpy()


@dataclass
class PMIFit:
    """V^T PMI [d, vocab] (summed over templates), the kept PMI columns [N, k], and the cost."""
    vt_pmi: np.ndarray
    kept: np.ndarray
    seconds: float
    lm_tokens: int


def pmi_projection(lm, tok, texts: list[str], vectors: np.ndarray, cfg: QueryBuildConfig,
                   progress: bool = True) -> PMIFit:
    """Stream the catalog through the LM once per template: V^T PMI without holding [N, vocab]."""
    from tqdm.auto import tqdm

    from distill.teacher import pad_id
    n, d = vectors.shape
    V = vectors.astype(np.float64)
    keep = list(cfg.keep_tokens)
    pad = pad_id(tok)
    cut = [_cut(tok, t, cfg.max_text_tokens) for t in texts]  # the same for every template
    vt_total, kept_total, t0, tokens = None, np.zeros((n, len(keep))), time.perf_counter(), 0
    for template in cfg.templates:
        vt_l, lse, kept = None, None, np.zeros((n, len(keep)))
        for s in tqdm(range(0, n, cfg.batch_items), desc="query encoder: LM over items", disable=not progress,
                      leave=False):
            ids = _encode(tok, [template.format(text=t, domain=cfg.domain) for t in cut[s:s + cfg.batch_items]])
            tokens += sum(map(len, ids))
            L = _next_token_logprobs(lm, ids, pad)
            part = V[s:s + len(ids)].T @ L
            vt_l = part if vt_l is None else vt_l + part
            m = L.max(0)
            chunk = m + np.log(np.exp(L - m).sum(0))
            lse = chunk if lse is None else np.logaddexp(lse, chunk)
            kept[s:s + len(ids)] = L[:, keep]
        c = lse - np.log(n)  # log mean_j p(w | j)
        vt_pmi = vt_l - V.sum(0)[:, None] * c[None, :]
        vt_total = vt_pmi if vt_total is None else vt_total + vt_pmi
        kept_total += kept - c[keep][None, :]
    k = len(cfg.templates)
    return PMIFit(vt_total / k, kept_total / k, time.perf_counter() - t0, tokens)


def ridge_token_vectors(vectors: np.ndarray, vt_pmi: np.ndarray, ridge: float) -> np.ndarray:
    """[vocab, d] float32: (V^T V + lam I)^-1 V^T PMI, lam = ridge * trace(V^T V) / d."""
    V = vectors.astype(np.float64)
    g = V.T @ V
    lam = ridge * np.trace(g) / g.shape[0]
    return np.linalg.solve(g + lam * np.eye(g.shape[0]), vt_pmi).T.astype(np.float32)


def save_query_encoder(folder: Path, tok, token_vectors: np.ndarray, weight: float, item_table_version: int,
                       source: str, extra: Optional[dict] = None) -> Path:
    """Write onnx/query/: tokenizer.json, token_vectors.npy, meta.json (written last, whole, by rename)."""
    from distill.io import atomic_path
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("the teacher's tokenizer has no fast (tokenizers) backend to save as tokenizer.json")
    with atomic_path(folder / TOKENIZER_FILE) as tmp:
        backend.save(str(tmp))
    with atomic_path(folder / VECTORS_FILE) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(token_vectors, dtype=np.float32))
    meta = dict(format=FORMAT, version=FORMAT_VERSION, dim=int(token_vectors.shape[1]),
                vocab=int(token_vectors.shape[0]),
                lowercase=True, word_prefix=" ", pooling="sum", weight=float(weight), max_query_chars=500,
                item_table_version=int(item_table_version), source=source, **(extra or {}))
    with atomic_path(folder / META_FILE) as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=2))
    return folder


def set_weight(folder: Path, weight: float, extra: Optional[dict] = None) -> dict:
    """Replace meta.json's weight (and add `extra` keys) atomically; the runtime reads it at load."""
    from distill.io import atomic_path
    if not (np.isfinite(weight) and weight > 0):
        raise ValueError(f"query weight must be finite and > 0, got {weight}")
    path = Path(folder) / META_FILE
    meta = json.loads(path.read_text())
    meta.update(weight=float(weight), **(extra or {}))
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=2))
    return meta


def build_query_encoder(lm, tok, texts: list[str], vectors: np.ndarray, out_dir: Path, item_table_version: int,
                        source: str, cfg: Optional[QueryBuildConfig] = None,
                        progress: bool = True) -> tuple[Path, PMIFit]:
    """The whole build: PMI projection over the catalog, ridge fit, artifact written. Returns (folder, fit)."""
    cfg = cfg or QueryBuildConfig()
    if len(texts) != len(vectors):
        raise ValueError(f"{len(texts)} item texts for {len(vectors)} item vectors: they must be the same items")
    fit = pmi_projection(lm, tok, texts, vectors, cfg, progress)
    tv = ridge_token_vectors(vectors, fit.vt_pmi, cfg.ridge)
    cfg_rec = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k != "keep_tokens"}
    folder = save_query_encoder(out_dir, tok, tv, cfg.weight, item_table_version, source,
                                extra=dict(build=dict(cfg_rec, seconds=round(fit.seconds, 1), lm_tokens=fit.lm_tokens,
                                                      items=len(texts))))
    return folder, fit
