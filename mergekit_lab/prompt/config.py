"""Configurations of the two prompt methods.

* ``pt``   -- PEFT's own :class:`peft.PromptTuningConfig` (a saved PT module is a stock PEFT
  prompt-tuning adapter folder).
* ``dept`` -- :class:`DePTConfig`, a subclass of ``PromptTuningConfig`` that adds the low-rank
  embedding update (Shi & Lipani, ICLR 2024). PEFT 0.21 cannot register a new method from
  outside (``register_peft_method`` only accepts names already in the closed ``PeftType``
  enum), so DePT folders use PEFT's layout (``adapter_config.json`` with ``peft_type: "DEPT"``
  + ``adapter_model.safetensors``) and are loaded by :func:`mergekit_lab.prompt.io.load_prompt_module`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from peft import PromptTuningConfig

from mergekit_lab.errors import UserError

DEPT_PEFT_TYPE = "DEPT"
PT_PEFT_TYPE = "PROMPT_TUNING"
METHODS = ("pt", "dept")
PADDING_MODES = ("mask", "original")
INIT_CHOICES = ("text", "vocab", "random")
DEFAULT_INIT_TEXT = "Classify the following input and answer with the correct label."

# Names of the freshly initialised heads that are trained alongside the prompt, as PEFT does
# for sequence classification (its ``modules_to_save`` default is ["classifier", "score"]).
HEAD_MODULE_NAMES = ("classifier", "score", "classification_head")


@dataclass
class DePTConfig(PromptTuningConfig):
    """Decomposed prompt tuning: an ``m x d`` soft prompt plus ``scale * A @ B`` added to the
    frozen input token embeddings, ``A: (s x r)``, ``B: (r x d)``, ``scale = lora_alpha / sqrt(r)``.

    ``padding_mode="mask"`` (ours, default) applies the update only at real (non-padding) tokens,
    with dynamic padding; ``"original"`` reproduces the reference code: inputs are padded to
    ``max_length`` and the update is added at every one of the ``s`` positions.
    """

    r: int = field(default=30, metadata={"help": "rank of the embedding update A @ B"})
    lora_alpha: float = field(default=8.0, metadata={"help": "scale = lora_alpha / sqrt(r)"})
    max_length: int = field(default=256, metadata={"help": "s: number of rows of A (max input length)"})
    padding_mode: str = field(default="mask", metadata={"help": "'mask' (ours) or 'original'"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = DEPT_PEFT_TYPE
        if int(self.r) < 1:
            raise UserError(f"DePT rank r must be >= 1, got {self.r}", hint="use --method pt for no update")
        if int(self.max_length) < 1:
            raise UserError(f"DePT max_length (s) must be >= 1, got {self.max_length}")
        if self.padding_mode not in PADDING_MODES:
            raise UserError(
                f"unknown DePT padding mode {self.padding_mode!r}",
                hint=f"choose one of {', '.join(PADDING_MODES)}",
            )

    @property
    def scale(self) -> float:
        return float(self.lora_alpha) / math.sqrt(int(self.r))
