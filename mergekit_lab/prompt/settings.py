"""Settings of ``mklab prompt-tune`` (groups on the shared settings machinery)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from mergekit_lab.settings import (
    CommandSettings,
    DataSettings,
    ModelSettings,
    RunSettings,
    Section,
    TrainingSettings,
)


class PromptTrainingSettings(TrainingSettings):
    """The shared training group with prompt-tuning defaults (DePT: prompt lr 3e-1, wd 1e-5)."""

    learning_rate: float = Field(3e-1, gt=0, description="Learning rate of the soft prompt (paper: 3e-1).")
    weight_decay: float = Field(
        1e-5, ge=0, description="AdamW weight decay on prompt, A, B and head weights."
    )


class PromptOptions(Section):
    method: Literal["pt", "dept"] = Field(
        "dept", description="pt: vanilla prompt tuning; dept: decomposed prompt tuning."
    )
    prefix_length: int | None = Field(
        None,
        gt=0,
        description="Soft prompt length m (default: 60 for dept, 100 for pt; chosen by --match-pt-length).",
    )
    r: int | None = Field(None, gt=0, description="Rank of DePT's embedding update A @ B (default 30).")
    lora_alpha: float = Field(8.0, gt=0, description="DePT scale = lora_alpha / sqrt(r).")
    lora_embedding_lr: float = Field(
        1e-4, gt=0, description="Learning rate of A and B (paper: 1e-4 to 5e-3)."
    )
    head_lr: float | None = Field(
        None, gt=0, description="Learning rate of a classification head (default: --lora-embedding-lr)."
    )
    match_pt_length: int | None = Field(
        None, gt=0, description="Choose m and r so that DePT has exactly the parameters of PT of this length."
    )
    padding_mode: Literal["mask", "original"] = Field(
        "mask",
        description="mask: no update at padding, dynamic padding; original: pad to s, update everywhere.",
    )
    prompt_init: Literal["text", "vocab", "random"] = Field(
        "text", description="Prompt init: embeddings of a text, sampled vocabulary, or uniform random."
    )
    init_text: str | None = Field(
        None, description="Text for --prompt-init text (default: a generic instruction)."
    )
    init_from: Path | None = Field(
        None, description="Start from a trained PT/DePT folder (prompt, and A, B)."
    )
    test_split: str | None = Field(
        None, description="Also evaluate the best module on this labelled split (e.g. test) at the end."
    )


class PromptTuneSettings(CommandSettings):
    run: RunSettings = RunSettings()
    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    training: PromptTrainingSettings = PromptTrainingSettings()
    prompt: PromptOptions = PromptOptions()
