"""Saving and loading prompt modules in PEFT's adapter folder layout.

A folder holds ``adapter_config.json`` (PEFT's config JSON) and ``adapter_model.safetensors``
with PEFT's key names: ``prompt_embeddings`` (m x d), for sequence classification the trained
head as ``base_model.<head>.<param>``, and for DePT ``lora_embedding_A`` (s x r) and
``lora_embedding_B`` (r x d). A PT folder is exactly what ``PeftModel.save_pretrained`` writes
for prompt tuning, so stock PEFT (``PeftModel.from_pretrained``) loads it; a DePT folder has
``peft_type: "DEPT"``, which PEFT cannot load (its method registry is closed), so it is loaded
with :func:`load_prompt_module`.

For ``mklab eval --model BASE --adapter DIR``::

    from mergekit_lab.prompt.io import is_prompt_module, load_prompt_module
    if is_prompt_module(DIR):
        model = load_prompt_module(model, DIR)      # returns a PromptTunedModel (eval mode)
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from peft import PromptTuningConfig
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_lab.errors import UserError
from mergekit_lab.prompt.config import DEPT_PEFT_TYPE, PT_PEFT_TYPE, DePTConfig
from mergekit_lab.prompt.model import PromptTunedModel, infer_task_type

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PROMPT_KEY = "prompt_embeddings"
LORA_A_KEY = "lora_embedding_A"
LORA_B_KEY = "lora_embedding_B"
HEAD_PREFIX = "base_model."


def adapter_state_dict(model: PromptTunedModel) -> dict[str, torch.Tensor]:
    """The module's trained tensors under PEFT's key names (fp32, CPU, contiguous)."""
    out = {PROMPT_KEY: model.prompt.detach().float().cpu().contiguous().clone()}
    if model.is_dept:
        out[LORA_A_KEY] = model.lora_embedding_A.detach().float().cpu().contiguous().clone()
        out[LORA_B_KEY] = model.lora_embedding_B.detach().float().cpu().contiguous().clone()
    for name, p in model.head_parameters():
        out[HEAD_PREFIX + name] = p.detach().cpu().contiguous().clone()
    return out


def save_prompt_module(
    model: PromptTunedModel, save_directory, *, base_model_name_or_path: str | None = None
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``save_directory``."""
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.peft_config
    changes = {"inference_mode": True}
    if base_model_name_or_path is not None:
        changes["base_model_name_or_path"] = str(base_model_name_or_path)
    elif cfg.base_model_name_or_path is None:
        changes["base_model_name_or_path"] = getattr(model.base_model.config, "_name_or_path", None) or None
    cfg = dataclasses.replace(cfg, **changes)
    cfg.save_pretrained(str(out))
    meta = {"format": "pt", "method": "dept" if model.is_dept else "pt"}
    save_file(adapter_state_dict(model), str(out / WEIGHTS_NAME), metadata=meta)
    return out


def is_prompt_module(directory) -> bool:
    """True when ``directory`` holds a PT or DePT adapter folder."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        return False
    try:
        peft_type = json.loads(path.read_text()).get("peft_type")
    except (OSError, json.JSONDecodeError):
        return False
    return peft_type in (PT_PEFT_TYPE, DEPT_PEFT_TYPE)


def read_prompt_config(directory) -> PromptTuningConfig:
    """The config of a PT (``PromptTuningConfig``) or DePT (``DePTConfig``) folder."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise UserError(
            f"no {CONFIG_NAME} in {directory}", hint="pass a folder written by mklab prompt-tune or PEFT"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from exc
    peft_type = raw.get("peft_type")
    if peft_type == DEPT_PEFT_TYPE:
        cls = DePTConfig
    elif peft_type == PT_PEFT_TYPE:
        cls = PromptTuningConfig
    else:
        raise UserError(
            f"{path} describes a {peft_type!r} adapter, not a prompt module",
            hint=f"expected peft_type {PT_PEFT_TYPE} or {DEPT_PEFT_TYPE}",
        )
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - fields)
    if unknown:
        logger.warning("ignoring unknown keys in %s: %s", path, ", ".join(unknown))
    kwargs = {k: v for k, v in raw.items() if k in fields}
    # Only the saved values matter: skip PEFT's TEXT checks (the weights are loaded below).
    kwargs["inference_mode"] = True
    if kwargs.get("prompt_tuning_init") == "TEXT" and not kwargs.get("tokenizer_name_or_path"):
        kwargs["prompt_tuning_init"] = "RANDOM"
    if kwargs.get("modules_to_save"):
        kwargs["modules_to_save"] = list(dict.fromkeys(kwargs["modules_to_save"]))
    return cls(**kwargs)


def adapter_base_model(directory) -> str | None:
    """The base model reference recorded in a PT/DePT folder (``base_model_name_or_path``)."""
    return read_prompt_config(directory).base_model_name_or_path or None


def read_prompt_tensors(directory) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        other = Path(directory) / "adapter_model.bin"
        hint = (
            "pickled adapter_model.bin is not read (no unpickling); re-save with safetensors"
            if other.exists()
            else None
        )
        raise UserError(f"no {WEIGHTS_NAME} in {directory}", hint=hint)
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def load_prompt_module(model: torch.nn.Module, directory, *, is_trainable: bool = False) -> PromptTunedModel:
    """Wrap ``model`` (the frozen base) with the PT/DePT module saved in ``directory``.

    Strict: every tensor must be present with the right shape. With ``is_trainable=False`` the
    result is in eval mode with nothing trainable."""
    cfg = read_prompt_config(directory)
    kind = infer_task_type(model)
    if cfg.task_type is not None and cfg.task_type != kind:
        raise UserError(
            f"the prompt module in {directory} was trained for task type {cfg.task_type}, "
            f"but the model {type(model).__name__} is {kind}",
            hint="load the base model with the same head as in training",
        )
    if cfg.task_type is None:
        cfg.task_type = kind
    pm = PromptTunedModel(model, cfg)
    tensors = read_prompt_tensors(directory)
    expected = {PROMPT_KEY: pm.prompt}
    if pm.is_dept:
        expected[LORA_A_KEY] = pm.lora_embedding_A
        expected[LORA_B_KEY] = pm.lora_embedding_B
    for name, p in pm.head_parameters():
        expected[HEAD_PREFIX + name] = p
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"prompt module {directory} does not fit the model: missing {missing or 'none'}, unexpected {unexpected or 'none'}",
            hint="load it on the same base model and head it was trained with",
        )
    with torch.no_grad():
        for key, param in expected.items():
            t = tensors[key]
            if tuple(t.shape) != tuple(param.shape):
                raise UserError(
                    f"tensor {key} in {directory} has shape {tuple(t.shape)}, the model expects {tuple(param.shape)}"
                )
            param.copy_(t.to(param.dtype))
    if not is_trainable:
        for p in pm.parameters():
            p.requires_grad_(False)
        pm.eval()
    return pm
