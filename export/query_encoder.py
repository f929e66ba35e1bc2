"""Text queries -> a direction in the student's item-vector space (numpy + `tokenizers`; no torch).

    enc = QueryEncoder.load("runs/default/onnx/query", expected_dim=64)
    q_hat = enc.encode("space opera with robots")        # float32 [d], unit length

The runtime adds `weight * q_hat` to the user vector u before retrieval (u' = u + w q_hat), so the steered
score of item i is u @ v_i + w q_hat @ v_i + b_i: one vector shift, no extra model call, and both the exact and
the ANN retriever serve it unchanged (export/runtime.py).

The artifact, <onnx_dir>/query/ (written by `distillrec query RUN`):

    tokenizer.json      a HuggingFace `tokenizers` file (Tokenizer.from_file)
    token_vectors.npy   float32 [V, d]: one row per token id, in the item-vector space (d = vectors.npy width)
    meta.json           {"format": "distillrec-query-encoder", "version": 1, "dim": d, "vocab": V,
                         "lowercase": bool, "word_prefix": str, "pooling": "sum" | "mean", "weight": w > 0,
                         "max_query_chars": int, "item_table_version": int, "source": str}

Encoding (`encode`): strip; refuse empty and over-long text; lowercase (meta); words = the runs of
[\\w'-] (unicode aware); each word is tokenized as word_prefix + word and contributes its FIRST token's row
(a word the tokenizer yields no token for is skipped); the rows are summed (or averaged) and L2-normalised.
Only the first token counts so that a word's vector does not depend on how finely the vocabulary splits it
(a rare word split in five pieces would otherwise weigh five times a common one). A query whose rows sum to
zero (every word unknown: its token row is zero) is refused: it carries no direction.

`tokenizers` is imported only when a query folder is loaded (the `query` extra: pip install "distillrec[query]"),
so the runtime without query support needs nothing beyond numpy and onnxruntime.
"""
from __future__ import annotations

import functools
import json
import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from export.runtime import RequestError, RuntimeArtifactError

__all__ = ["QueryEncoder", "FORMAT", "FORMAT_VERSION", "QUERY_DIR", "TOKENIZER_FILE", "VECTORS_FILE", "META_FILE",
           "INSTALL_HINT", "BUILD_HINT", "POOLINGS"]

QUERY_DIR = "query"
"""Sub-folder of the runtime folder (runs/<name>/onnx/query) holding the query encoder."""
TOKENIZER_FILE = "tokenizer.json"
VECTORS_FILE = "token_vectors.npy"
META_FILE = "meta.json"
FORMAT = "distillrec-query-encoder"
FORMAT_VERSION = 1
POOLINGS = ("sum", "mean")
INSTALL_HINT = 'pip install "distillrec[query]" (the tokenizers package)'
BUILD_HINT = "build it with `distillrec query RUN` (writes <run>/onnx/query/)"
_WORD = re.compile(r"[\w'-]+")
_WORD_CACHE = 1 << 16
"""Words whose first token id is remembered (queries repeat words; a tokenizer call costs ~5-20 us)."""


def _artifact_error(path: Path, problem: str) -> RuntimeArtifactError:
    return RuntimeArtifactError(f"{path}: {problem}; rebuild the query encoder ({BUILD_HINT})")


def _import_tokenizer_class():
    """tokenizers.Tokenizer, imported here (not at module import): only a runtime that serves queries needs it."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ImportError(f"this export has a query encoder, which needs the `tokenizers` package: {INSTALL_HINT}; "
                          f"or construct the Recommender with use_query_encoder=False to serve without queries") from e
    return Tokenizer


def _read_meta(path: Path) -> dict:
    if not path.is_file():
        raise _artifact_error(path, "missing")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _artifact_error(path, f"corrupt ({e})") from e
    if not isinstance(meta, dict):
        raise _artifact_error(path, "corrupt (not a JSON object)")
    return meta


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_meta(meta: dict, path: Path) -> None:
    """Every field the encoding rule reads, with its type; raises naming the first bad one."""
    if meta.get("format") != FORMAT:
        raise _artifact_error(path, f"format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise _artifact_error(path, f"version is {meta.get('version')!r}, this runtime reads version {FORMAT_VERSION}")
    for key in ("dim", "vocab", "max_query_chars"):
        if not _is_int(meta.get(key)) or meta[key] < 1:
            raise _artifact_error(path, f"{key} must be a positive int, got {meta.get(key)!r}")
    if not isinstance(meta.get("lowercase"), bool):
        raise _artifact_error(path, f"lowercase must be true or false, got {meta.get('lowercase')!r}")
    if not isinstance(meta.get("word_prefix"), str):
        raise _artifact_error(path, f"word_prefix must be a string, got {meta.get('word_prefix')!r}")
    if meta.get("pooling") not in POOLINGS:
        raise _artifact_error(path, f"pooling must be one of {list(POOLINGS)}, got {meta.get('pooling')!r}")
    w = meta.get("weight")
    if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w <= 0:
        raise _artifact_error(path, f"weight must be a finite number > 0, got {w!r}")
    v = meta.get("item_table_version")
    if v is not None and not _is_int(v):
        raise _artifact_error(path, f"item_table_version must be an int, got {v!r}")


def _load_vectors(path: Path, meta: dict, meta_path: Path, expected_dim: Optional[int]) -> np.ndarray:
    """token_vectors.npy as float32 [vocab, dim], checked against meta.json and the item table's width."""
    if not path.is_file():
        raise _artifact_error(path, "missing")
    try:
        vec = np.asarray(np.load(path, mmap_mode="r", allow_pickle=False))
    except (OSError, ValueError) as e:
        raise _artifact_error(path, f"corrupt ({e})") from e
    if vec.dtype != np.float32 or vec.ndim != 2:
        raise _artifact_error(path, f"must be a float32 [vocab, dim] array, got {vec.dtype} {vec.shape}")
    if vec.shape[0] != meta["vocab"]:
        raise _artifact_error(meta_path, f"vocab={meta['vocab']} but {path.name} has {vec.shape[0]} rows")
    if vec.shape[1] != meta["dim"]:
        raise _artifact_error(meta_path, f"dim={meta['dim']} but {path.name} has {vec.shape[1]} columns")
    if expected_dim is not None and meta["dim"] != int(expected_dim):
        raise _artifact_error(meta_path, f"dim={meta['dim']} but the item table holds {expected_dim}-d vectors "
                                         f"(the query encoder belongs to another student)")
    if not np.isfinite(vec).all():
        raise _artifact_error(path, "holds NaN/inf values")
    return vec


def _load_tokenizer(path: Path, vocab: int):
    if not path.is_file():
        raise _artifact_error(path, "missing")
    tokenizer_cls = _import_tokenizer_class()
    try:
        tok = tokenizer_cls.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type for any parse error
        raise _artifact_error(path, f"corrupt ({type(e).__name__}: {str(e)[:200]})") from e
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > vocab:
        raise _artifact_error(path, f"the tokenizer has {size} token ids but {VECTORS_FILE} only {vocab} rows")
    return tok


@dataclass(frozen=True, eq=False)
class QueryEncoder:
    """A loaded query folder: text -> unit vector in the item-vector space. Immutable and thread-safe (the word
    cache is an lru_cache, safe under concurrent requests)."""

    folder: Path
    tokenizer: Any
    token_vectors: np.ndarray
    meta: dict

    @classmethod
    def load(cls, folder: Union[str, Path], expected_dim: Optional[int] = None) -> "QueryEncoder":
        """Load and check <folder>/{meta.json, token_vectors.npy, tokenizer.json}. expected_dim: the served item
        vectors' width (a mismatch is a RuntimeArtifactError). Without `tokenizers`: ImportError with the fix."""
        folder = Path(folder)
        meta_path = folder / META_FILE
        meta = _read_meta(meta_path)
        _check_meta(meta, meta_path)
        vectors = _load_vectors(folder / VECTORS_FILE, meta, meta_path, expected_dim)
        tokenizer = _load_tokenizer(folder / TOKENIZER_FILE, meta["vocab"])
        return cls(folder=folder, tokenizer=tokenizer, token_vectors=vectors, meta=meta)

    def __post_init__(self):
        object.__setattr__(self, "_first_id", functools.lru_cache(maxsize=_WORD_CACHE)(self._first_token))

    # ---- meta
    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def weight(self) -> float:
        """w in u' = u + w q_hat."""
        return float(self.meta["weight"])

    @property
    def max_query_chars(self) -> int:
        return int(self.meta["max_query_chars"])

    @property
    def item_table_version(self) -> Optional[int]:
        """The item table version the token vectors were fitted against (informational: items added since are
        still reachable, their vectors come from their text)."""
        return self.meta.get("item_table_version")

    @property
    def source(self) -> Optional[str]:
        return self.meta.get("source")

    # ---- encoding
    def words(self, text) -> list[str]:
        """The words of a query after the checks (str, not blank, at most max_query_chars) and lowercasing."""
        if not isinstance(text, str):
            raise RequestError(f"query must be a string, got {type(text).__name__}")
        text = text.strip()
        if not text:
            raise RequestError("query is empty: send some words, or leave the query out")
        if len(text) > self.max_query_chars:
            raise RequestError(f"query has {len(text)} characters; the limit is {self.max_query_chars} "
                               f"(max_query_chars): shorten it")
        if self.meta["lowercase"]:
            text = text.lower()
        words = _WORD.findall(text)
        if not words:
            raise RequestError(f"query {text[:60]!r} holds no word (letters, digits, ' or -)")
        return words

    def _first_token(self, word: str) -> int:
        """The first token id of prefix + word, or -1 when the tokenizer yields none (or refuses the word:
        a WordLevel vocabulary without an unknown token raises for an unknown word)."""
        try:
            ids = self.tokenizer.encode(self.meta["word_prefix"] + word, add_special_tokens=False).ids
        except Exception:  # noqa: BLE001 - tokenizers' own error type: the word is simply not known
            return -1
        return int(ids[0]) if ids else -1

    def encode(self, text) -> np.ndarray:
        """q_hat: float32 [dim], unit length. RequestError for a bad query or one no word of which is known."""
        ids = [i for i in map(self._first_id, self.words(text)) if i >= 0]
        if not ids:
            raise RequestError("no word of the query is known to the query encoder: rephrase it")
        rows = self.token_vectors[np.asarray(ids, dtype=np.int64)]
        q = rows.sum(axis=0, dtype=np.float64)
        if self.meta["pooling"] == "mean":
            q /= len(ids)
        norm = float(np.linalg.norm(q))
        if norm == 0.0 or not math.isfinite(norm):
            raise RequestError("no word of the query is known to the query encoder: rephrase it")
        return (q / norm).astype(np.float32)

    def encode_batch(self, texts: Sequence) -> np.ndarray:
        """float32 [B, dim], one q_hat per text (the first bad text raises, naming its position when B > 1)."""
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
            raise RequestError(f"queries must be a list of strings, got {type(texts).__name__}")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for row, t in enumerate(texts):
            try:
                out[row] = self.encode(t)
            except RequestError as e:
                if len(texts) > 1:
                    raise RequestError(f"queries[{row}]: {e}") from None
                raise
        return out
