"""Export configuration (the `export:` section of a run config): validated by distill's generic builder.

Torch-free: the runtime, the service and Triton never need it, but tools that only read a run's config.yaml may.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

from distill.config import Config, build_config
from export.contract import PROVIDER_ALIASES  # short names (any case); anything else is a full onnxruntime name


@dataclass
class ExportConfig(Config):
    _section: ClassVar[str] = "export"
    opset: int = 20
    """Opset 23's Attention op broke on onnxruntime CPU with padding masks; 20 decomposes attention."""
    parity_tol: float = 1e-4
    """Largest |onnx - torch| allowed on any output at the parity points (a negative value fails every check;
    tests use it to force a failure)."""
    top_k: int = 10
    """K of the top-K agreement the parity check and the variants' report compare."""
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    """Execution providers in preference order (tensorrt / cuda / cpu or full ORT names); what actually
    serves is read back from the session and recorded."""
    variants: list[Literal["opt", "int8", "fp16"]] = field(default_factory=lambda: ["opt", "int8", "fp16"])
    """ORT-optimized graph, INT8 dynamic quantization, FP16 with fp32 I/O (GPU-only at serving time)."""
    encoder_variants: list[Literal["opt", "int8", "qdq", "fp16"]] = field(
        default_factory=lambda: ["opt", "int8", "qdq", "fp16"])
    """Variants of the two-part user encoder (encoder.<name>.onnx, export/optimize.py): ORT-optimized, dynamic
    INT8, static INT8 (QDQ, calibrated on training histories when the export is given them, else on random
    requests) and FP16 (GPU only); each placed only when it passes its parity check."""
    int8_include_catalog_matmul: bool = False
    """Quantizing the catalog-scoring MatMul costs top-K agreement; excluded by default."""
    strict_variants: bool = False
    """A variant failing its parity check fails the export (default: warn and leave it out)."""
    teacher: bool = True
    """Also export the teacher (LoRA merged, with heads) to onnx/teacher.onnx for the benchmark."""

    def __post_init__(self):
        super().__post_init__()
        self._at_least(1, "opset", "top_k")
        if not self.providers:
            self._fail("providers", "list at least one execution provider (e.g. [cpu])")
        for name in self.providers:
            if not (name.strip().lower() in PROVIDER_ALIASES or name.strip().endswith("ExecutionProvider")):
                self._fail("providers", f"{name!r} is not a provider; use {', '.join(PROVIDER_ALIASES)} or a full "
                                        "onnxruntime name such as CUDAExecutionProvider")


def export_config_from_run(values: Optional[dict]) -> ExportConfig:
    """The export section of a run's config dict (its config.yaml); the other sections belong to distill and
    the bench."""
    return build_config(ExportConfig, (values or {}).get("export"), "export")
