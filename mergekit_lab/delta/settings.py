"""Settings of parameter-efficient delta modules (the ``delta`` group of ``mklab train``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from mergekit_lab.settings import Section

KINDS = ("lora", "prefix", "adapter")
NON_LINEARITIES = ("relu", "gelu", "tanh", "swish")


class DeltaSettings(Section):
    """Which delta module to train on a frozen backbone, and its hyperparameters."""

    peft: Literal["lora", "prefix", "adapter"] | None = Field(
        None, description="Train a parameter-efficient module on a frozen backbone instead of the full model.")
    lora_r: int = Field(8, gt=0, description="LoRA rank r.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=list,
        description="Modules that get LoRA / adapters (names or name suffixes; default: per architecture).")
    prefix_length: int = Field(20, gt=0, description="Prefix tuning: number of virtual tokens per layer.")
    prefix_projection: bool = Field(False, description="Prefix tuning: reparameterise the prefix with an MLP.")
    prefix_hidden_size: int | None = Field(None, gt=0, description="Prefix tuning: hidden size of the projection MLP.")
    adapter_size: int = Field(12, gt=0, description="Bottleneck adapter: size of the down-projection.")
    adapter_non_linearity: Literal["relu", "gelu", "tanh", "swish"] = Field(
        "relu", description="Bottleneck adapter: non-linearity between down- and up-projection.")
    peft_init: Path | None = Field(
        None, description="Start from this module folder (e.g. an ensembled one); its type and shape win.")

    @property
    def active(self) -> bool:
        return self.peft is not None or self.peft_init is not None
