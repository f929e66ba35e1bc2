"""distillrec: the orchestration layer above distill (training), export (ONNX, runtime, service) and serve_bench
(benchmark). The CLI (distillrec.cli) and the pipeline config (distillrec.config) are the only code that
imports all three."""
from distill import __version__

__all__ = ["__version__"]
