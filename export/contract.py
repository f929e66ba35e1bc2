"""The artifact contract between the exporter and everything that serves its output: one place, torch-free.

Stdlib only (no numpy, no onnxruntime, no torch), so the exporter (export/onnx_export.py, optimize.py,
teacher_export.py), the serving runtime (export/runtime.py, providers.py, service.py), the Triton writer
(export/triton.py) and the benchmark (serve_bench) all import the same names instead of writing them out.

A run folder after `distillrec export runs/<name>`:

    runs/<name>/onnx/            SERVING_DIR: what production ships (a few MB)
        encoder.onnx             ENCODER_FILE: the user encoder (history item vectors -> user vector + tower
                                 features), the served graph of two-part serving (the default)
        encoder.{opt,int8,qdq,fp16}.onnx   ENCODER_VARIANT_FILES (only those that passed their parity check)
        scorer.onnx              SCORER_FILE: rating / like from the user's and the candidates' tower features
        items/                   ITEM_TABLE_DIR: the item table, versioned (export/item_table.py):
            CURRENT              the served version's folder name, replaced atomically
            v000001/             vectors, bias, tower features, active flags, ids, popularity, text vectors
        student.onnx             STUDENT_FILE, the single FP32 graph (catalog inside: the parity reference
                                 and the single-graph mode of the runtime)
        student.{opt,int8,fp16}.onnx   VARIANT_FILES (only the variants that passed their parity check)
        runtime.json             RUNTIME_META_FILE, schema SCHEMA_VERSION (REQUIRED_META_KEYS at least)
        parity.json              PARITY_FILE
    runs/<name>/teacher_onnx/    TEACHER_ONNX_DIR: the exported teacher, for the benchmark only (~0.5 GB)
        teacher.onnx             TEACHER_ONNX_FILE
        teacher_parity.json      TEACHER_PARITY_FILE

The teacher lives outside onnx/ so that shipping onnx/ never ships the teacher. TensorRT engine caches are
never written into the model folder (it may be a read-only mount): see export/runtime.py, `trt_cache_dir`.

Changing a name or a dtype here is a schema change: bump SCHEMA_VERSION (the runtime refuses other versions).
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

# ------------------------------------------------------------------------------------------------ schema
SCHEMA_VERSION = 2
"""runtime.json "schema_version" this package writes (2: two-part serving with an item table)."""
READ_SCHEMA_VERSIONS = (1, 2)
"""Versions the runtime reads: 1 = single graph only (served as before), 2 = two-part + single graph."""

# ------------------------------------------------------------------------------------------------ files
SERVING_DIR = "onnx"
"""Folder of a run that holds the serving artifacts (student graphs + runtime.json)."""
STUDENT_FILE = "student.onnx"
"""The FP32 student graph, runtime.json's default "model_file"."""
VARIANT_FILES = {"opt": "student.opt.onnx", "int8": "student.int8.onnx", "fp16": "student.fp16.onnx"}
"""variant name -> file name inside SERVING_DIR (export/optimize.py builds them)."""
ENCODER_FILE = "encoder.onnx"
"""The user encoder graph of two-part serving."""
ENCODER_VARIANT_FILES = {"opt": "encoder.opt.onnx", "int8": "encoder.int8.onnx", "qdq": "encoder.qdq.onnx",
                         "fp16": "encoder.fp16.onnx"}
"""encoder variant name -> file name inside SERVING_DIR."""
SCORER_FILE = "scorer.onnx"
"""rating / like from tower features (only for models with a rating or like head)."""
ITEM_TABLE_DIR = "items"
"""Folder of SERVING_DIR holding the versioned item table (export/item_table.py)."""
RUNTIME_META_FILE = "runtime.json"
"""Serving metadata (raw item ids, popularity, tasks, outputs, variants, ...)."""
PARITY_FILE = "parity.json"
"""Parity of the FP32 graph and of every variant against the PyTorch student."""
TEACHER_ONNX_DIR = "teacher_onnx"
"""Folder of a run that holds the exported teacher: NOT inside SERVING_DIR."""
TEACHER_ONNX_FILE = "teacher.onnx"
TEACHER_PARITY_FILE = "teacher_parity.json"
TEACHER_ONNX_RELPATH = f"{TEACHER_ONNX_DIR}/{TEACHER_ONNX_FILE}"
"""The teacher graph's path relative to the run folder."""

# ------------------------------------------------------------------------------------------------ graph
STUDENT_INPUTS = {
    # name: (dtype, symbolic axes); the order is the graph's input order
    "history_items": ("int64", ("batch", "history")),      # internal ids, LEFT-padded with 0
    "history_ratings": ("float32", ("batch", "history")),  # 1..5, 0 = unknown / padding
    "history_length": ("int64", ("batch",)),               # real length per row, 0 = empty history
    "candidates": ("int64", ("batch", "candidates")),      # internal ids to score for rating / like
}
INPUT_NAMES = tuple(STUDENT_INPUTS)
INPUT_DTYPES = {name: dtype for name, (dtype, _) in STUDENT_INPUTS.items()}
INPUT_AXES = {name: axes for name, (_, axes) in STUDENT_INPUTS.items()}
TASK_OUTPUTS = {"next_item": "next_item_scores", "rating": "rating", "like": "like_logit"}
"""task -> output name, in output order; every output is float32."""
OUTPUT_DTYPE = "float32"
SCORES_OUTPUT = TASK_OUTPUTS["next_item"]
"""[batch, n_items]; the other outputs are [batch, candidates]."""
RATING_RANGE = (1, 5)
"""Valid history ratings; 0 means unknown."""
RATING_TASKS = ("rating", "like")
"""Tasks only trained when the data has ratings: a model with none of them never saw a rating as input."""

# two-part serving: the encoder reads rows of the item table (gathered by the runtime), so new items need no export
ENCODER_INPUTS = {
    "history_vectors": ("float32", ("batch", "history", "dim")),  # item table rows of the history, LEFT-padded
    "history_ratings": ("float32", ("batch", "history")),
    "history_length": ("int64", ("batch",)),
}
ENCODER_INPUT_NAMES = tuple(ENCODER_INPUTS)
ENCODER_OUTPUTS = {"next_item": "user_vector", "rating": "rating_user", "like": "like_user"}
"""task -> encoder output: next_item's user vector [batch, dim]; rating / like tower user features [batch, hidden]."""
SCORER_INPUTS = {"rating": ("rating_user", "rating_items"), "like": ("like_user", "like_items")}
"""task -> (user features [batch, hidden], candidate features [batch, candidates, hidden]) scorer inputs."""
SCORER_OUTPUTS = {"rating": "rating", "like": "like_logit"}
"""task -> scorer output [batch, candidates] (the same names as the single graph's outputs)."""

TEACHER_INPUT_NAMES = ("input_ids", "attention_mask", "before_pos", "item_pos")
"""The exported teacher's inputs (export/teacher_export.py); outputs follow TASK_OUTPUTS."""

# ------------------------------------------------------------------------------------------------ runtime.json
REQUIRED_META_KEYS = ("item_ids", "max_history", "tasks", "outputs", "n_items")
META_PRECISION = "distillrec.precision"
"""ONNX metadata_props key stamping a file's precision (fp32 / int8 / fp16)."""
META_VARIANT = "distillrec.variant"
EXPORT_HINT = "run `distillrec export <run>`"

# ------------------------------------------------------------------------------------------------ providers
TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PROVIDER_ALIASES = {"tensorrt": TRT, "trt": TRT, "cuda": CUDA, "gpu": CUDA, "cpu": CPU}
"""Short names accepted anywhere a provider is named (any case)."""
PROVIDER_PRIORITY = {TRT: 0, CUDA: 1, CPU: 3}
"""Sort key of requested providers; any other provider gets 2 (kept in the order given)."""

TRT_CACHE_ENV = "DISTILLREC_TRT_CACHE"
"""Environment variable naming the root folder of TensorRT engine / timing caches (see export/runtime.py)."""


def serving_dir(run_dir: Union[str, Path]) -> Path:
    """runs/<name> -> runs/<name>/onnx."""
    return Path(run_dir) / SERVING_DIR


def teacher_onnx_dir(run_dir: Union[str, Path]) -> Path:
    """runs/<name> -> runs/<name>/teacher_onnx (outside the serving folder)."""
    return Path(run_dir) / TEACHER_ONNX_DIR


def teacher_onnx_path(run_dir: Union[str, Path]) -> Path:
    return Path(run_dir) / TEACHER_ONNX_RELPATH


def item_table_dir(onnx_dir: Union[str, Path]) -> Path:
    """runs/<name>/onnx -> runs/<name>/onnx/items."""
    return Path(onnx_dir) / ITEM_TABLE_DIR


def uses_ratings(tasks) -> bool:
    """Whether a model with these tasks was trained with ratings in its input (runtime.json "uses_ratings")."""
    return any(t in RATING_TASKS for t in tasks)
