"""One entry point that builds a PT or DePT model around a frozen base model."""

from __future__ import annotations

import torch
from peft import PromptTuningConfig

from mergekit_lab.errors import UserError
from mergekit_lab.prompt.config import DEFAULT_INIT_TEXT, METHODS, DePTConfig
from mergekit_lab.prompt.init import init_from_module, init_prompt
from mergekit_lab.prompt.model import PromptTunedModel, hidden_size, infer_task_type


def make_prompt_config(
    method: str,
    *,
    task_type: str,
    num_virtual_tokens: int,
    token_dim: int,
    r: int = 30,
    lora_alpha: float = 8.0,
    max_length: int = 256,
    padding_mode: str = "mask",
    init: str = "text",
    init_text: str | None = None,
    tokenizer_name_or_path: str | None = None,
    base_model_name_or_path: str | None = None,
) -> PromptTuningConfig:
    """The PEFT config (``PromptTuningConfig`` for pt, ``DePTConfig`` for dept) of a new module."""
    if method not in METHODS:
        raise UserError(f"unknown prompt method {method!r}", hint=f"choose one of {', '.join(METHODS)}")
    if int(num_virtual_tokens) < 1:
        raise UserError(f"--prefix-length must be >= 1, got {num_virtual_tokens}")
    peft_init = {"text": "TEXT", "vocab": "SAMPLE_VOCAB", "random": "RANDOM"}.get(init)
    if peft_init is None:
        raise UserError(f"unknown prompt init {init!r}", hint="choose one of text, vocab, random")
    text = (init_text or DEFAULT_INIT_TEXT) if init == "text" else None
    if peft_init == "TEXT" and not tokenizer_name_or_path:
        # PEFT requires a tokenizer name with TEXT; without one the config records the text only.
        peft_init = "RANDOM"
    common = dict(
        task_type=task_type,
        num_virtual_tokens=int(num_virtual_tokens),
        token_dim=int(token_dim),
        num_transformer_submodules=1,  # PEFT's default 2 for seq2seq allocates m unused rows
        prompt_tuning_init=peft_init,
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=tokenizer_name_or_path if peft_init == "TEXT" else None,
        base_model_name_or_path=base_model_name_or_path,
    )
    if method == "pt":
        return PromptTuningConfig(**common)
    return DePTConfig(
        **common,
        r=int(r),
        lora_alpha=float(lora_alpha),
        max_length=int(max_length),
        padding_mode=padding_mode,
    )


def build_prompt_model(
    base_model: torch.nn.Module,
    method: str,
    *,
    num_virtual_tokens: int,
    r: int = 30,
    lora_alpha: float = 8.0,
    max_length: int = 256,
    padding_mode: str = "mask",
    init: str = "text",
    init_text: str | None = None,
    tokenizer=None,
    seed: int = 0,
    init_from=None,
    base_model_name_or_path: str | None = None,
) -> PromptTunedModel:
    """Freeze ``base_model`` and attach a new PT/DePT module, initialised as asked.

    ``init_from`` (a PT/DePT folder) overrides ``init`` for the prompt and, DePT to DePT, A and B."""
    cfg = make_prompt_config(
        method,
        task_type=infer_task_type(base_model),
        num_virtual_tokens=num_virtual_tokens,
        token_dim=hidden_size(base_model),
        r=r,
        lora_alpha=lora_alpha,
        max_length=max_length,
        padding_mode=padding_mode,
        init=init,
        init_text=init_text,
        tokenizer_name_or_path=(getattr(tokenizer, "name_or_path", None) or None)
        if tokenizer is not None
        else None,
        base_model_name_or_path=base_model_name_or_path,
    )
    torch.manual_seed(int(seed))  # A's kaiming init
    model = PromptTunedModel(base_model, cfg)
    if init_from is not None:
        init_from_module(model, init_from)
    else:
        init_prompt(model, init, tokenizer=tokenizer, text=cfg.prompt_tuning_init_text, seed=seed)
    return model
