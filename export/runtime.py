"""Serving runtime for the exported student: stdlib + numpy + onnxruntime only (no torch, no distill.*).

    rec = Recommender("runs/default/onnx")
    rec.recommend(["50", "172", "133"], ratings=[5, 4, 3], k=10)   # -> [(item_id, score), ...]
    rec.score(["50", "172"], candidates=["1", "2"])                # -> {"rating", "like", "like_logit"}

Inputs are raw item ids (as in the training data; ints are accepted and matched as strings). Ratings are
1..5, or 0 for "unknown"; no ratings at all means every rating is unknown. A history longer than
max_history keeps its most recent max_history interactions (the order given is chronological), but every
item of the full history counts as seen for `exclude_seen`.

One InferenceSession is shared; `InferenceSession.run` is thread-safe and this object holds no mutable
state after construction, so a Recommender can serve concurrent requests.

Providers and variants: see the Recommender docstring and docs/export.md.
"""
from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import onnxruntime as ort

from export.providers import CPU, ProviderFallbackWarning, build_providers, create_session  # noqa: F401

SCHEMA_VERSION = 1
INPUT_NAMES = ("history_items", "history_ratings", "history_length", "candidates")
_FIX = "run `distillrec export <run>`"
_REQUIRED = ("item_ids", "max_history", "tasks", "outputs", "n_items")


class RuntimeArtifactError(RuntimeError):
    """The runtime folder (runtime.json / model file) is missing, corrupt or from another schema."""


class UnsupportedProviderError(RuntimeError):
    """The model cannot be served by the provider onnxruntime would use (FP16 on CPU), or a required provider
    does not serve (strict_providers=True)."""


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x)).astype(np.float32)


def _provider_name(p) -> str:
    return p[0] if isinstance(p, (tuple, list)) else str(p)


class Recommender:
    """Raw-id recommender over one exported model file of a runtime folder (runs/<name>/onnx).

    providers: names in any order, e.g. ["tensorrt", "cuda", "cpu"] (default: runtime.json "providers");
      they are put in TensorRT -> CUDA -> CPU order, filtered to this onnxruntime build, and CPU is always the
      last resort. TensorRT gets FP16, engine + timing caches in <folder>/trt_cache and min/opt/max profile
      shapes for every input (`trt_profile` overrides them, see export.providers.DEFAULT_PROFILE).
      `.requested_providers` is what was asked for, `.providers` what the session really runs (read back from
      onnxruntime); when they differ a ProviderFallbackWarning is emitted (and logged), or, with
      strict_providers=True, UnsupportedProviderError is raised.
    variant / model_file: which model of the folder to serve: a variant name of runtime.json "variants"
      ("fp32", "opt", "int8", "fp16") or a file name. The FP16 variant is GPU-only: loading it where
      onnxruntime would run it on the CPU provider raises UnsupportedProviderError.
    """

    def __init__(self, folder, providers: Optional[list] = None, unknown_items: str = "error",
                 empty_history: str = "error", intra_op_threads: Optional[int] = None,
                 model_file: Optional[str] = None, variant: Optional[str] = None, strict_providers: bool = False,
                 trt_profile: Optional[dict] = None):
        if unknown_items not in ("error", "drop"):
            raise ValueError(f"unknown_items must be 'error' or 'drop', got {unknown_items!r}")
        if empty_history not in ("error", "popularity"):
            raise ValueError(f"empty_history must be 'error' or 'popularity', got {empty_history!r}")
        if intra_op_threads is not None and (not isinstance(intra_op_threads, int) or intra_op_threads < 0):
            raise ValueError(f"intra_op_threads must be a non-negative int or None, got {intra_op_threads!r}")
        if model_file is not None and variant is not None:
            raise ValueError("pass either model_file or variant, not both")
        self.folder = Path(folder)
        self.unknown_items, self.empty_history = unknown_items, empty_history
        self.meta = self._load_meta(self.folder / "runtime.json")
        m = self.meta
        self.item_ids: list[str] = [str(x) for x in m["item_ids"]]
        self.n_items = len(self.item_ids)
        self.index: dict[str, int] = {x: i for i, x in enumerate(self.item_ids)}
        self.max_history = int(m["max_history"])
        self.top_k = int(m.get("top_k", 10))
        self.tasks: list[str] = list(m["tasks"])
        self.output_names: list[str] = list(m["outputs"])
        self.like_threshold = float(m.get("like_threshold", 4.0))
        self.rating_range = tuple(m.get("rating_range", [1, 5]))
        pop = np.asarray(m.get("item_popularity") or [0] * self.n_items, dtype=np.float64)
        if pop.shape != (self.n_items,):
            raise RuntimeArtifactError(f"{self.folder / 'runtime.json'}: item_popularity has {pop.shape[0]} "
                                       f"entries for {self.n_items} items; {_FIX}")
        self.item_popularity = pop
        self.variant, self.precision, file_name = self._pick_model(model_file, variant)
        self.model_path = self.folder / file_name
        self.session, self.provider_record = self._make_session(providers, intra_op_threads, strict_providers,
                                                                trt_profile)
        self.providers: list[str] = list(self.session.get_providers())
        self.requested_providers: list[str] = list(self.provider_record["requested"])

    # ------------------------------------------------------------------------------------------ loading
    @property
    def variants(self) -> dict:
        """runtime.json "variants": {name: {"file", "precision", "gpu_only"}} (fp32 only for older exports)."""
        v = self.meta.get("variants")
        if isinstance(v, dict) and v:
            return v
        return {"fp32": {"file": self.meta.get("model_file", "student.onnx"), "precision": "fp32", "gpu_only": False}}

    def _pick_model(self, model_file, variant) -> tuple[Optional[str], Optional[str], str]:
        """-> (variant name or None, precision or None, file name)."""
        variants = self.variants
        if variant is not None:
            if variant not in variants:
                raise RuntimeArtifactError(f"variant {variant!r} is not in {self.folder / 'runtime.json'} "
                                           f"(available: {sorted(variants)}); a variant that failed its parity "
                                           f"check is not listed, see parity.json; {_FIX}")
            v = variants[variant]
            return variant, v.get("precision"), str(v["file"])
        name = model_file or self.meta.get("model_file", "student.onnx")
        if Path(name).name != name:
            raise ValueError(f"model_file must be a file name inside {self.folder}, got {name!r}")
        for k, v in variants.items():
            if v.get("file") == name:
                return k, v.get("precision"), name
        return None, None, name

    @staticmethod
    def _load_meta(path: Path) -> dict:
        if not path.is_file():
            raise RuntimeArtifactError(f"{path} is missing; {_FIX}")
        try:
            meta = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RuntimeArtifactError(f"{path} is corrupt ({e}); {_FIX}") from e
        if not isinstance(meta, dict):
            raise RuntimeArtifactError(f"{path} is corrupt (not a JSON object); {_FIX}")
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise RuntimeArtifactError(f"{path} has schema_version={meta.get('schema_version')!r}, this runtime "
                                       f"reads {SCHEMA_VERSION}; {_FIX}")
        missing = [k for k in _REQUIRED if k not in meta]
        if missing:
            raise RuntimeArtifactError(f"{path} lacks {missing}; {_FIX}")
        if not isinstance(meta["item_ids"], list) or len(meta["item_ids"]) != meta["n_items"] \
                or "next_item_scores" not in meta["outputs"]:
            raise RuntimeArtifactError(f"{path} is inconsistent (item_ids vs n_items, or no next_item_scores "
                                       f"output); {_FIX}")
        return meta

    def _fp16_refusal(self, where: str, record: dict) -> UnsupportedProviderError:
        return UnsupportedProviderError(
            f"{self.model_path.name} is the FP16 variant, which is GPU-only, but onnxruntime {where} "
            f"CPUExecutionProvider (requested {record.get('requested')}, available in this build "
            f"{record.get('available')}). Fused FP16 graphs have crashed onnxruntime's CPU provider, so the "
            f"runtime refuses it: on CPU serve student.onnx, student.opt.onnx or student.int8.onnx "
            f"(variant='fp32' / 'opt' / 'int8'); for FP16 use providers=['tensorrt', 'cuda'] with "
            f"onnxruntime-gpu on a machine with a working GPU.")

    def _make_session(self, providers, intra_op_threads, strict: bool, trt_profile):
        path = self.model_path
        if not path.is_file():
            raise RuntimeArtifactError(f"{path} is missing; {_FIX}")
        wanted = list(providers or self.meta.get("providers") or [CPU])
        chosen, record = build_providers(wanted, cache_dir=self.folder / "trt_cache", max_history=self.max_history,
                                         profile=trt_profile)
        if self.precision == "fp16" and [_provider_name(p) for p in chosen] == [CPU]:
            raise self._fp16_refusal("can only run it on", record)
        opts = ort.SessionOptions()
        if intra_op_threads is not None:
            opts.intra_op_num_threads = intra_op_threads
        try:
            sess, record = create_session(path, chosen, record, sess_options=opts, what=str(path))
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            raise RuntimeArtifactError(f"{path} cannot be loaded by onnxruntime {ort.__version__} "
                                       f"({type(e).__name__}: {str(e).strip()[:300]}); {_FIX}") from e
        if self.precision is None:  # a file runtime.json does not list: the export stamps its precision
            meta = sess.get_modelmeta().custom_metadata_map or {}
            self.precision = meta.get("distillrec.precision")
        if self.precision == "fp16" and record["actual"][0] == CPU:
            raise self._fp16_refusal("fell back to", record)
        if strict and record["fallback"]:
            raise UnsupportedProviderError(record["fallback_warning"])
        ins = [i.name for i in sess.get_inputs()]
        outs = [o.name for o in sess.get_outputs()]
        if ins != list(INPUT_NAMES) or outs != self.output_names:
            raise RuntimeArtifactError(f"{path} has inputs {ins} / outputs {outs}; runtime.json expects "
                                       f"{list(INPUT_NAMES)} / {self.output_names}; {_FIX}")
        return sess, record

    # ------------------------------------------------------------------------------------------ encoding
    def _check_history(self, history, what: str = "history") -> list:
        if isinstance(history, np.ndarray):
            if history.ndim != 1:
                raise ValueError(f"{what} must be a 1-D sequence of item ids, got an array of shape {history.shape}")
            history = history.tolist()
        if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
            raise ValueError(f"{what} must be a list/sequence of item ids, got {type(history).__name__}")
        return list(history)

    def _to_key(self, x) -> str:
        if isinstance(x, str):
            return x
        if isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, (bool, np.bool_)):
            return str(int(x))
        raise ValueError(f"item ids must be str (or int), got {type(x).__name__} {x!r}")

    def _lookup(self, ids: list, what: str, allow_drop: bool) -> tuple[list[int], list[int]]:
        """-> (internal ids, positions kept). Unknown ids raise (or are dropped when configured)."""
        keys = [self._to_key(x) for x in ids]
        out, kept, unknown = [], [], []
        for pos, k in enumerate(keys):
            i = self.index.get(k)
            if i is None:
                unknown.append(k)
            else:
                out.append(i)
                kept.append(pos)
        if unknown and not (allow_drop and self.unknown_items == "drop"):
            shown = ", ".join(repr(u) for u in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            hint = " (or construct the Recommender with unknown_items='drop')" if allow_drop else ""
            raise ValueError(f"{len(unknown)} unknown item id(s) in {what}: {shown}; the catalog has "
                             f"{self.n_items} items{hint}")
        return out, kept

    def _check_ratings(self, ratings, n: int, what: str) -> np.ndarray:
        if ratings is None:
            return np.zeros(n, dtype=np.float32)
        if isinstance(ratings, np.ndarray):
            if ratings.ndim != 1 or not (np.issubdtype(ratings.dtype, np.integer)
                                         or np.issubdtype(ratings.dtype, np.floating)):
                raise ValueError(f"{what} ratings must be a 1-D numeric array, got dtype {ratings.dtype} "
                                 f"shape {ratings.shape}")
            vals = ratings.astype(np.float64)
        else:
            if isinstance(ratings, (str, bytes)) or not isinstance(ratings, Sequence):
                raise ValueError(f"{what} ratings must be a list of numbers, got {type(ratings).__name__}")
            for r in ratings:
                if isinstance(r, (bool, np.bool_)) or not isinstance(r, (numbers.Real, np.number)):
                    raise ValueError(f"{what} ratings must be numbers, got {type(r).__name__} {r!r}")
            vals = np.asarray(list(ratings), dtype=np.float64)
        if vals.shape[0] != n:
            raise ValueError(f"{what}: {vals.shape[0]} ratings for {n} history items; pass one rating per item")
        if not np.all(np.isfinite(vals)):
            raise ValueError(f"{what} ratings contain NaN/inf: {vals[~np.isfinite(vals)].tolist()[:10]}")
        lo, hi = self.rating_range
        bad = (vals != 0) & ((vals < lo) | (vals > hi))
        if bad.any():
            raise ValueError(f"{what} ratings must lie in [{lo}, {hi}] (0 = unknown); got {vals[bad].tolist()[:10]}")
        return vals.astype(np.float32)

    def _prepare(self, histories, ratings) -> tuple[list[list[int]], list[np.ndarray], list[set]]:
        """Validate a batch: -> (truncated internal histories, their ratings, full seen sets)."""
        if isinstance(histories, (str, bytes)) or not isinstance(histories, (Sequence, np.ndarray)):
            raise ValueError(f"histories must be a list of histories, got {type(histories).__name__}")
        histories = list(histories)
        if not histories:
            raise ValueError("histories is empty: pass at least one history")
        if ratings is not None:
            if isinstance(ratings, (str, bytes)) or not isinstance(ratings, (Sequence, np.ndarray)):
                raise ValueError(f"ratings must be a list (one per history), got {type(ratings).__name__}")
            ratings = list(ratings)
            if len(ratings) != len(histories):
                raise ValueError(f"{len(ratings)} rating lists for {len(histories)} histories")
        items, rates, seen = [], [], []
        for row, h in enumerate(histories):
            what = f"history[{row}]" if len(histories) > 1 else "history"
            h = self._check_history(h, what)
            r = self._check_ratings(None if ratings is None else ratings[row], len(h), what)
            ids, kept = self._lookup(h, what, allow_drop=True)
            r = r[kept]
            seen.append(set(ids))
            items.append(ids[-self.max_history:])
            rates.append(r[-self.max_history:] if ids else r)
        return items, rates, seen

    def encode_histories(self, histories, ratings=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw-id histories -> left-padded (items int64 [B, L], ratings float32 [B, L], length int64 [B]).

        L is the batch's longest (truncated) history, at least 1; padding is item 0 / rating 0.
        """
        items, rates, _ = self._prepare(histories, ratings)
        return self._pad(items, rates)

    def _pad(self, items: list[list[int]], rates: list[np.ndarray]):
        b = len(items)
        L = max(1, max(len(h) for h in items))
        arr_i = np.zeros((b, L), dtype=np.int64)
        arr_r = np.zeros((b, L), dtype=np.float32)
        length = np.zeros(b, dtype=np.int64)
        for row, (h, r) in enumerate(zip(items, rates)):
            n = len(h)
            length[row] = n
            if n:
                arr_i[row, L - n:] = h
                arr_r[row, L - n:] = r
        return arr_i, arr_r, length

    # ------------------------------------------------------------------------------------------ low level
    @staticmethod
    def _int_array(x, name: str) -> np.ndarray:
        a = np.asarray(x)
        if a.dtype.kind not in "iu":
            raise ValueError(f"{name} must hold integers (int64 ids / lengths), got dtype {a.dtype}")
        return np.ascontiguousarray(a, dtype=np.int64)

    def predict_arrays(self, history_items, history_ratings, history_length, candidates=None) -> dict:
        """One session call on internal, already LEFT-padded arrays -> {output name: array}.

        A history axis longer than max_history keeps its last max_history columns (the most recent items) and
        lengths are capped accordingly, as the model's position table holds max_history slots."""
        items = self._int_array(history_items, "history_items")
        length = self._int_array(history_length, "history_length")
        r = np.asarray(history_ratings)
        if r.dtype.kind not in "iuf":
            raise ValueError(f"history_ratings must be numeric, got dtype {r.dtype}")
        rates = np.ascontiguousarray(r, dtype=np.float32)
        if items.ndim != 2 or rates.shape != items.shape or length.shape != (items.shape[0],):
            raise ValueError(f"expected history_items/history_ratings [B, L] and history_length [B]; got "
                             f"{items.shape}, {rates.shape}, {length.shape}")
        b, L = items.shape
        if b < 1 or L < 1:
            raise ValueError(f"batch and history axes must be >= 1 (pad an empty history to length 1 with "
                             f"history_length 0); got {items.shape}")
        if not np.all(np.isfinite(rates)):
            raise ValueError("history_ratings contain NaN/inf")
        if candidates is None:
            candidates = np.zeros((b, 1), dtype=np.int64)
        cand = self._int_array(candidates, "candidates")
        if cand.ndim != 2 or cand.shape[0] != b or cand.shape[1] < 1:
            raise ValueError(f"candidates must be [B={b}, C>=1], got {cand.shape}")
        if length.min() < 0 or length.max() > L:
            raise ValueError(f"history_length must lie in [0, {L}], got {length.tolist()}")
        for name, a in (("history_items", items), ("candidates", cand)):
            if a.min() < 0 or a.max() >= self.n_items:
                raise ValueError(f"{name} holds ids outside [0, {self.n_items})")
        if L > self.max_history:
            items = np.ascontiguousarray(items[:, -self.max_history:])
            rates = np.ascontiguousarray(rates[:, -self.max_history:])
            length = np.minimum(length, self.max_history)
        feed = {"history_items": items, "history_ratings": rates, "history_length": length, "candidates": cand}
        return dict(zip(self.output_names, self.session.run(self.output_names, feed)))

    # ------------------------------------------------------------------------------------------ recommend
    def _check_k(self, k) -> int:
        k = self.top_k if k is None else k
        if isinstance(k, bool) or not isinstance(k, (numbers.Integral, np.integer)) or k <= 0:
            raise ValueError(f"k must be a positive int, got {k!r}")
        return int(k)

    def _exclusions(self, exclude, b: int) -> list[set]:
        if exclude is None:
            return [set() for _ in range(b)]
        if isinstance(exclude, (str, bytes)) or not isinstance(exclude, (Sequence, np.ndarray)) or len(exclude) != b:
            raise ValueError(f"exclude must be a list with one id list per history ({b})")
        out = []
        for row, ex in enumerate(exclude):
            if ex is None:
                out.append(set())
                continue
            ex = self._check_history(ex, f"exclude[{row}]")
            # ids outside the catalog cannot be recommended anyway: ignore them
            out.append({self.index[k] for k in map(self._to_key, ex) if k in self.index})
        return out

    def _top_k(self, scores: np.ndarray, banned: set, k: int) -> list[tuple[str, float]]:
        s = scores.astype(np.float64, copy=True)
        if banned:
            s[list(banned)] = -np.inf
        k = min(k, self.n_items - len(banned))
        if k <= 0:
            return []
        order = np.argsort(-s, kind="stable")[:k]
        return [(self.item_ids[i], float(scores[i])) for i in order]

    def recommend_batch(self, histories, ratings=None, k: Optional[int] = None, exclude_seen: bool = True,
                        exclude=None) -> list[list[tuple[str, float]]]:
        """Top-k (item id, score) per history, one session call for the batch.

        `exclude`: None or one list of ids per history, masked out besides the seen items.
        Empty histories raise unless empty_history='popularity' (then: most popular unexcluded items).
        """
        k = self._check_k(k)
        items, rates, seen = self._prepare(histories, ratings)
        excl = self._exclusions(exclude, len(items))
        empty = [row for row, h in enumerate(items) if not h]
        if empty and self.empty_history != "popularity":
            raise ValueError(f"empty history at row(s) {empty[:20]} (after dropping unknown ids); pass at least "
                             f"one known item or construct the Recommender with empty_history='popularity'")
        live = [row for row in range(len(items)) if items[row]]
        results: list[list[tuple[str, float]]] = [[] for _ in items]
        if live:
            arr_i, arr_r, length = self._pad([items[r] for r in live], [rates[r] for r in live])
            scores = self.predict_arrays(arr_i, arr_r, length)["next_item_scores"]
            for j, row in enumerate(live):
                banned = (seen[row] if exclude_seen else set()) | excl[row]
                results[row] = self._top_k(scores[j], banned, k)
        for row in empty:
            banned = (seen[row] if exclude_seen else set()) | excl[row]
            results[row] = self._top_k(self.item_popularity, banned, k)
        return results

    def recommend(self, history, ratings=None, k: Optional[int] = None, exclude_seen: bool = True,
                  exclude=None) -> list[tuple[str, float]]:
        return self.recommend_batch([self._check_history(history)], None if ratings is None else [ratings], k,
                                    exclude_seen, None if exclude is None else [exclude])[0]

    # ------------------------------------------------------------------------------------------ score
    def score_batch(self, histories, candidates, ratings=None) -> list[dict[str, np.ndarray]]:
        """rating / like (probability) / like_logit per candidate, for each history (one session call)."""
        heads = [t for t in ("rating", "like") if t in self.tasks]
        if not heads:
            raise ValueError(f"this model has no rating/like head (tasks={self.tasks}); only recommend() works")
        items, rates, _ = self._prepare(histories, ratings)
        if isinstance(candidates, (str, bytes)) or not isinstance(candidates, (Sequence, np.ndarray)) \
                or len(candidates) != len(items):
            raise ValueError(f"candidates must be a list with one id list per history ({len(items)})")
        cand_ids = []
        for row, c in enumerate(candidates):
            what = f"candidates[{row}]" if len(items) > 1 else "candidates"
            c = self._check_history(c, what)
            if not c:
                raise ValueError(f"{what} is empty: pass at least one item to score")
            ids, _ = self._lookup(c, what, allow_drop=False)
            cand_ids.append(ids)
        empty = [row for row, h in enumerate(items) if not h]
        if empty and self.empty_history != "popularity":
            raise ValueError(f"empty history at row(s) {empty[:20]} (after dropping unknown ids); construct the "
                             f"Recommender with empty_history='popularity' to score from an empty history")
        arr_i, arr_r, length = self._pad(items, rates)
        C = max(len(c) for c in cand_ids)
        arr_c = np.zeros((len(items), C), dtype=np.int64)
        for row, c in enumerate(cand_ids):
            arr_c[row, :len(c)] = c
        out = self.predict_arrays(arr_i, arr_r, length, arr_c)
        results = []
        for row, c in enumerate(cand_ids):
            n = len(c)
            res = {}
            if "rating" in out:
                res["rating"] = out["rating"][row, :n].copy()
            if "like_logit" in out:
                logit = out["like_logit"][row, :n].copy()
                res["like_logit"] = logit
                res["like"] = _sigmoid(logit)
            results.append(res)
        return results

    def score(self, history, candidates, ratings=None) -> dict[str, np.ndarray]:
        return self.score_batch([self._check_history(history)], [self._check_history(candidates, "candidates")],
                                None if ratings is None else [ratings])[0]

    def __repr__(self) -> str:
        return (f"Recommender({str(self.folder)!r}, n_items={self.n_items}, tasks={self.tasks}, "
                f"providers={self.providers})")
