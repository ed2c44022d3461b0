"""mklab: reuse fine-tuned language models (merging, PEFT ensembling, causal distillation, DePT)."""

__version__ = "0.1.0"
