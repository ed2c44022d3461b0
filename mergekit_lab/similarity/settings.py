"""Settings of ``mklab similarity``."""

from __future__ import annotations

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


class SimilarityDataSettings(DataSettings):
    task: str | None = Field(None, description="The target task (its dev data is scored; its train data tuned on).",
                             json_schema_extra={"flag": "--target"})


class SimilarityTrainingSettings(TrainingSettings):
    max_steps: int = Field(200, description="Steps of the short tunes (reference for kl/cos_weights; "
                                            "per source for euclidean/performance).")
    learning_rate: float = Field(5e-4, gt=0, description="Learning rate of the short tunes (AdamW).")


class SimilarityOptions(Section):
    pool: list[str] = Field(default_factory=list,
                            description="Module folders, or folders holding them (e.g. pool/); one per source.")
    all_targets: bool = Field(False, description="Leave-one-out: every task of the pool is the target in turn "
                                                 "(weight matrix + heatmap).")
    measure: list[str] = Field(default_factory=lambda: ["loss"],
                               description="Measure(s): loss kl el2n cos_logits_labels grand euclidean performance "
                                           "cos_weights, or the baselines uniform category.")
    temperature: float | None = Field(None, gt=0, description="Softmax temperature (default: the measure's own, "
                                                               "0.1 or 0.001).")
    granularity: Literal["model", "block", "layer"] = Field(
        "model", description="One weight per source, per transformer block, or per sub-layer module "
                             "(block/layer: grand, euclidean, cos_weights).")
    num_examples: int | None = Field(None, gt=0, description="Target dev examples to score on (default: all, "
                                                             "up to --max-examples).")
    max_examples: int = Field(1000, gt=0, description="Cap on the target dev examples.")
    head: Literal["reference", "source"] = Field(
        "reference", description="Classifier head for scoring: the reference module's (tuned on the target) or "
                                 "each source's own (same label space needed). Text-to-text (T5) modules need no head.")
    categories: list[str] = Field(default_factory=list,
                                  description="Task groups for the category baseline: name=task1,task2 (several).")


class SimilaritySettings(CommandSettings):
    run: RunSettings = RunSettings()
    model: ModelSettings = ModelSettings()
    data: SimilarityDataSettings = SimilarityDataSettings()
    training: SimilarityTrainingSettings = SimilarityTrainingSettings()
    similarity: SimilarityOptions = SimilarityOptions()
