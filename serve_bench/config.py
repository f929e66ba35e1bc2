"""Benchmark configuration (the `bench:` section of a run config): validated by distill's generic builder."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

from distill.config import Config, build_config


@dataclass
class BenchConfig(Config):
    _section: ClassVar[str] = "bench"
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32, 128])
    """Requests per call of the main grid (natural-length histories, both workloads, all threads)."""
    n_requests: int = 256
    """Distinct test-user requests drawn for the workload (per request set)."""
    warmup: int = 5
    """Untimed calls before each point."""
    min_samples: int = 200
    """Timed calls per point at least (see min_seconds)."""
    min_seconds: float = 2.0
    """Each point is repeated until it has min_samples calls AND min_seconds of wall time."""
    max_seconds: float = 30.0
    """Hard cap on one student point's timed wall time: a stalled system cannot hold the run (the point
    records stopped_by='max_seconds')."""
    teacher_max_samples: int = 8
    """The teacher takes ~0.7 s per 500-token request on 2 CPU cores: cap its repetitions (stated in the report)."""
    teacher_max_seconds: float = 60.0
    """Cap on one teacher point's timed wall time (stated in the report)."""
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
    variants: list[Literal["fp32", "opt", "int8", "fp16"]] = field(
        default_factory=lambda: ["fp32", "opt", "int8", "fp16"])
    """Student ONNX variants benchmarked when their file exists (fp16 only on a GPU provider)."""
    two_part_variants: list[Literal["fp32", "opt", "int8", "qdq"]] = field(
        default_factory=lambda: ["fp32", "opt", "int8", "qdq"])
    """Two-part encoder variants benchmarked (CPU) when runtime.json "two_part" lists them: the served path,
    encoder + item table (empty list: no two-part rows). fp16 is GPU-only and not offered here."""
    gpu_providers: list[str] = field(default_factory=lambda: ["CUDAExecutionProvider", "TensorrtExecutionProvider"])
    """GPU providers tried when onnxruntime lists them; a row is kept only if the provider really serves."""
    teacher_onnx: bool = True
    """Benchmark onnx/teacher.onnx (teacher on onnxruntime) when the export wrote it."""
    teacher_onnx_quality: bool = True
    """Evaluate the ONNX teacher on the teacher's evaluation users (one LLM pass per user)."""
    rss: bool = True
    """Peak RSS of every system, each measured in a process of its own."""
    rss_batch: int = 8
    """Requests per call while the RSS is measured."""
    rss_calls: int = 5
    """Calls per RSS measurement (the peak covers the model's working memory, not only its weights)."""
    floor: bool = True
    """Roofline floor (trivial-graph overhead, matmul rate, FLOPs) and the onnxruntime operator profile."""
    profile_calls: int = 200
    """Calls of the onnxruntime operator profile."""
    loadtest: bool = False
    """Load-test the HTTP service (export.service) on 127.0.0.1 and put the result in the report."""
    loadtest_clients: int = 8
    """Concurrent clients of the load test."""
    loadtest_seconds: float = 10.0
    """Duration of the load test."""

    def __post_init__(self):
        super().__post_init__()
        for name in ("batch_sizes", "fixed_batch_sizes", "single_thread_batch_sizes", "concurrency"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                self._fail(name, "list at least one size, every size >= 1")
        if self.teacher_batch_sizes is not None and (not self.teacher_batch_sizes or min(self.teacher_batch_sizes) < 1):
            self._fail("teacher_batch_sizes", "sizes >= 1, or null for all of bench.batch_sizes")
        self._at_least(1, "n_requests", "min_samples", "teacher_max_samples", "teacher_candidates", "n_candidates",
                       "top_k", "fixed_history", "rss_batch", "rss_calls", "profile_calls", "loadtest_clients")
        self._at_least(0, "warmup", "min_seconds")
        self._positive("max_seconds", "teacher_max_seconds", "loadtest_seconds")
        if self.max_seconds < self.min_seconds:
            self._fail("max_seconds", f"must be >= bench.min_seconds={self.min_seconds} (the cap would cut every point)")


def bench_config_from_run(values: Optional[dict]) -> BenchConfig:
    """The bench section of a run's config dict (its config.yaml); the other sections belong to distill and
    export."""
    return build_config(BenchConfig, (values or {}).get("bench"), "bench")
