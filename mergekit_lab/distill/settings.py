"""Settings of `mklab binarize`, `count-tokens`, `extract-student` and `distill` (pydantic groups).

Each command's flags, presets and YAML keys come from these classes (see ``mergekit_lab.settings``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from mergekit_lab.settings import CommandSettings, RunSettings, Section, TrainingSettings


# --------------------------------------------------------------------------- binarize
class BinarizeOptions(Section):
    files: list[str] = Field(default_factory=list, description="Text files or folders, one document per line.")
    from_disk: str | None = Field(None, description="A datasets.save_to_disk folder to read instead of files.")
    dataset: str | None = Field(None, description="A Hugging Face Hub dataset name (needs a network), e.g. wikitext.")
    dataset_config: str | None = Field(None, description="Hub dataset configuration, e.g. wikitext-103-raw-v1.")
    split: str = Field("train", description="Dataset split (Hub or save_to_disk DatasetDict).")
    text_field: str = Field("text", description="Text column; 'a+b' joins several columns with a space.")
    tokenizer: str = Field("builtin:minilm", description="Tokenizer: local folder, builtin:minilm or Hub id.")
    output: Path | None = Field(None, description="Output folder (tokens.npy, offsets.npy, header.json).")
    num_proc: int = Field(1, ge=1, description="Tokenizer worker processes.")
    wrap: Literal["auto", "cls-sep", "bos-eos", "none"] = Field(
        "auto", description="Special tokens around each sequence ([CLS]..[SEP] for encoders, BOS..EOS for LMs)."
    )
    chunk_size: int = Field(1000, ge=1, description="Documents per worker task.")
    max_documents: int | None = Field(None, gt=0, description="Stop after this many documents.")
    combine: list[str] = Field(
        default_factory=list, description="Instead of tokenizing: concatenate these binarized folders into --output."
    )
    overwrite: bool = Field(False, description="Replace an existing output folder.")
    quiet: bool = Field(False, description="No progress bar.")


class BinarizeSettings(CommandSettings):
    binarize: BinarizeOptions = BinarizeOptions()


class CountTokensOptions(Section):
    data: Path | None = Field(None, description="A binarized corpus folder (from `mklab binarize`).")
    output: Path | None = Field(None, description="Output folder (counts.npy + header.json).")
    overwrite: bool = Field(False, description="Replace an existing output folder.")
    quiet: bool = Field(False, description="No progress bar.")


class CountTokensSettings(CommandSettings):
    count: CountTokensOptions = CountTokensOptions()


class ExtractStudentOptions(Section):
    teacher: str | None = Field(None, description="Teacher LM: local folder, builtin:minilm or Hub id.")
    num_layers: int | None = Field(None, gt=0, description="Student layers (default choice of teacher layers).")
    layers: list[int] = Field(
        default_factory=list, description="Teacher layers to copy, in order (default [0,2,4,7,9,11] for 6 of 12)."
    )
    student_arch: Literal["same", "distilbert"] = Field(
        "same", description="Student architecture: the teacher's, or DistilBERT (BERT/RoBERTa teachers)."
    )
    output: Path | None = Field(None, description="Output folder (a Hugging Face model folder).")
    overwrite: bool = Field(False, description="Replace an existing output folder.")
    quiet: bool = Field(False, description="No info lines.")


class ExtractStudentSettings(CommandSettings):
    extract: ExtractStudentOptions = ExtractStudentOptions()


class FitMlmHeadOptions(Section):
    model: str | None = Field(None, description="Encoder without a (good) MLM head, e.g. builtin:minilm.")
    data: Path | None = Field(None, description="Binarized corpus (same tokenizer) to train the head on.")
    token_counts: Path | None = Field(None, description="Token counts for the masking probabilities (optional).")
    output: Path | None = Field(None, description="Output folder (a masked-LM Hugging Face folder).")
    max_steps: int = Field(300, gt=0, description="Training steps.")
    batch_size: int = Field(32, gt=0, description="Sequences per step.")
    max_seq_length: int = Field(128, gt=2, description="Split longer sequences.")
    learning_rate: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    unfreeze_layers: int = Field(0, ge=0, description="Also train the top N encoder blocks (0: head only).")
    seed: int = Field(0, description="Random seed.")
    overwrite: bool = Field(False, description="Replace an existing output folder.")
    quiet: bool = Field(False, description="No progress bar.")


class FitMlmHeadSettings(CommandSettings):
    head: FitMlmHeadOptions = FitMlmHeadOptions()


# --------------------------------------------------------------------------- distill
class DistillModels(Section):
    teacher: str | None = Field(None, description="Teacher LM (masked LM with head, or GPT-2).")
    student: str | None = Field(None, description="Student LM folder (e.g. from `mklab extract-student`).")


class DistillData(Section):
    data: Path | None = Field(None, description="Binarized training corpus (from `mklab binarize`).")
    token_counts: Path | None = Field(None, description="Token counts (from `mklab count-tokens`) for MLM masking.")
    max_seq_length: int = Field(512, gt=2, description="Split longer sequences into chunks of this length.")
    min_seq_length: int = Field(12, ge=1, description="Drop sequences shorter than this (11 tokens or fewer).")
    max_unk_fraction: float = Field(0.5, gt=0, le=1, description="Drop sequences with this share of [UNK] or more.")
    max_sequences: int | None = Field(None, gt=0, description="Use at most this many sequences.")
    group_by_length: bool = Field(True, description="Batch sequences of similar length together.")
    eval_data: Path | None = Field(None, description="Binarized corpus for MLM perplexity at the end (optional).")
    max_eval_sequences: int | None = Field(2000, gt=0, description="At most this many evaluation sequences.")


class DistillLosses(Section):
    alpha_ce: float = Field(0.5, ge=0, description="Weight of the soft-target KL loss (T^2 scaled).")
    alpha_mlm: float = Field(0.0, ge=0, description="Weight of the student's masked-LM loss.")
    alpha_clm: float = Field(0.0, ge=0, description="Weight of the student's causal-LM loss (GPT-2).")
    alpha_mse: float = Field(0.0, ge=0, description="Weight of the MSE between logits.")
    alpha_cos: float = Field(0.0, ge=0, description="Weight of the cosine loss on last hidden states.")
    alpha_causal_ce: float = Field(0.0, ge=0, description="Weight of the KL loss on the intervened runs (DIITO).")
    alpha_causal_cos: float = Field(0.0, ge=0, description="Weight of the cosine loss on the intervened runs.")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the KL losses.")
    restrict_ce_to_mask: bool = Field(False, description="KL/MSE only on MLM-masked tokens.")
    mlm_mask_prop: float = Field(0.15, ge=0, le=1, description="Share of tokens to predict.")
    word_mask: float = Field(0.8, ge=0, le=1, description="Of those: share replaced by [MASK].")
    word_keep: float = Field(0.1, ge=0, le=1, description="Of those: share kept.")
    word_rand: float = Field(0.1, ge=0, le=1, description="Of those: share replaced by a random token.")
    mlm_smoothing: float = Field(0.7, ge=0, description="Masking probability ~ max(count,1)^-smoothing.")


class Interchange(Section):
    neuron_mapping: str = Field(
        "single_middle", description="Neuron mapping: single_middle, late, multilayer, or a .nm/.json file."
    )
    interchange_prop: float = Field(0.3, ge=0, le=1, description="Share of the shorter sequence's tokens to interchange.")
    interchange_max_token: int | None = Field(None, gt=0, description="At most this many interchanged tokens.")
    interchange_consecutive_only: bool = Field(True, description="One consecutive span (else random positions).")
    interchange_masked_only: bool = Field(False, description="Interchange only at MLM-masked positions.")


class DistillTraining(TrainingSettings):
    num_train_epochs: float = Field(3.0, gt=0, description="Epochs over the corpus (ignored when max_steps > 0).")
    per_device_train_batch_size: int = Field(5, gt=0, description="Sequences per device per micro-batch.")
    gradient_accumulation_steps: int = Field(50, gt=0, description="Micro-batches per optimisation step.")
    learning_rate: float = Field(5e-4, gt=0, description="Peak learning rate (AdamW).")
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="Share of steps for linear warmup.")
    max_grad_norm: float = Field(5.0, ge=0, description="Gradient clipping norm (0 disables).")
    save_steps: int | None = Field(500, gt=0, description="Checkpoint every N optimisation steps for --resume.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.98, ge=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-6, gt=0, description="AdamW epsilon.")
    freeze_pos_embs: bool = Field(False, description="Keep the student's position embeddings fixed.")
    stop_after_steps: int | None = Field(
        None, gt=0, description="Stop (as if interrupted) after N steps, keeping the checkpoint for --resume."
    )


class DistillSettings(CommandSettings):
    run: RunSettings = RunSettings()
    models: DistillModels = DistillModels()
    data: DistillData = DistillData()
    losses: DistillLosses = DistillLosses()
    interchange: Interchange = Interchange()
    training: DistillTraining = DistillTraining()
