"""Building, saving and loading delta modules (LoRA and prefix via PEFT, bottleneck adapters).

A module folder is PEFT's adapter layout::

    adapter_config.json          PEFT config (peft_type LORA / PREFIX_TUNING / BOTTLENECK_ADAPTER)
    adapter_model.safetensors    the module's tensors (+ the task head for classifiers, as PEFT's
                                 modules_to_save does), PEFT key names
    mklab_module.json            what mklab knows: kind, base model reference, task, label space

LoRA and prefix folders are exactly what ``PeftModel.save_pretrained`` writes, so stock PEFT
loads them; adapter folders are loaded by :func:`attach_module` (PEFT cannot load a method it
does not know). Prompt-tuning folders (PT / DePT, :mod:`mergekit_lab.prompt`) are recognised
and loaded through that package.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_lab.delta.adapter import (
    ADAPTER_PEFT_TYPE,
    HEAD_NAMES,
    AdapterConfig,
    adapter_state_dict,
    inject_adapters,
    load_adapter_state_dict,
)
from mergekit_lab.errors import UserError

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
META_NAME = "mklab_module.json"
KIND_OF_PEFT_TYPE = {"LORA": "lora", "PREFIX_TUNING": "prefix", ADAPTER_PEFT_TYPE: "adapter",
                     "PROMPT_TUNING": "pt", "DEPT": "dept"}


# --------------------------------------------------------------------------------------------
# building


def task_type_for(model: torch.nn.Module) -> str:
    """PEFT's task type for a transformers model class."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if name.endswith("ForQuestionAnswering"):
        return "QUESTION_ANS"
    if name.endswith("ForConditionalGeneration") or name.endswith("ForSeq2SeqLM"):
        return "SEQ_2_SEQ_LM"
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    return "FEATURE_EXTRACTION"


def make_config(delta, model: torch.nn.Module):
    """The PEFT config (LoRA / prefix) or :class:`AdapterConfig` for ``delta`` settings on ``model``."""
    from peft import LoraConfig, PrefixTuningConfig

    task_type = task_type_for(model)
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if delta.peft == "lora":
        kw: dict[str, Any] = {}
        if delta.target_modules:
            kw["target_modules"] = list(delta.target_modules)
        return LoraConfig(task_type=task_type, r=delta.lora_r, lora_alpha=delta.lora_alpha,
                          lora_dropout=delta.lora_dropout, base_model_name_or_path=base, **kw)
    if delta.peft == "prefix":
        kw = {}
        if delta.prefix_projection:
            kw["encoder_hidden_size"] = delta.prefix_hidden_size or model.config.hidden_size
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=delta.prefix_length,
                                  prefix_projection=delta.prefix_projection, base_model_name_or_path=base, **kw)
    if delta.peft == "adapter":
        return AdapterConfig(adapter_size=delta.adapter_size, non_linearity=delta.adapter_non_linearity,
                             target_modules=list(delta.target_modules), task_type=task_type,
                             base_model_name_or_path=base)
    raise UserError(f"unknown module type {delta.peft!r}", hint="choose lora, prefix or adapter")


def _apply_config(model: torch.nn.Module, config) -> torch.nn.Module:
    if isinstance(config, AdapterConfig):
        return inject_adapters(model, config)
    from peft import get_peft_model

    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise UserError(f"PEFT could not wrap {type(model).__name__}: {str(e).splitlines()[0]}",
                        hint="check --target-modules against the model's module names") from None


def wrap_model(model: torch.nn.Module, delta, *, seed: int = 42) -> torch.nn.Module:
    """A fresh (seeded) delta module of the kind ``delta.peft`` on a frozen ``model``."""
    config = make_config(delta, model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _apply_config(model, config)


def is_delta_model(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel) or hasattr(model, "mklab_adapter_config")


def delta_kind(model: torch.nn.Module) -> str:
    if hasattr(model, "mklab_adapter_config"):
        return "adapter"
    cfg = model.peft_config["default"]
    return KIND_OF_PEFT_TYPE.get(str(getattr(cfg.peft_type, "value", cfg.peft_type)), str(cfg.peft_type))


def module_config(model: torch.nn.Module):
    return model.mklab_adapter_config if hasattr(model, "mklab_adapter_config") else model.peft_config["default"]


def module_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's tensors (delta + head) under the names its folder uses."""
    if hasattr(model, "mklab_adapter_config"):
        return adapter_state_dict(model)
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model)
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def delta_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The live trainable delta parameters (no head), named like the folder's tensors where possible."""
    out: dict[str, torch.nn.Parameter] = {}
    heads = set(head_names(module_config(model)))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = name.replace(".default.", ".").replace(".modules_to_save.", ".")
        if name.startswith("prompt_encoder.default.embedding"):
            key = "prompt_embeddings"
        if is_head_key(key, heads):
            continue
        if hasattr(model, "mklab_adapter_config"):
            key = "base_model.model." + key
        out[key] = p
    return out


# --------------------------------------------------------------------------------------------
# folders


def head_names(config) -> list[str]:
    mts = config.get("modules_to_save") if isinstance(config, dict) else getattr(config, "modules_to_save", None)
    return list(dict.fromkeys([*(mts or []), *HEAD_NAMES]))


def is_head_key(key: str, heads) -> bool:
    """True for tensors of the task head (PEFT modules_to_save), False for delta tensors."""
    for prefix in ("base_model.model.", "base_model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    return key.split(".")[0] in set(heads)


def _config_dict(config) -> dict[str, Any]:
    if isinstance(config, AdapterConfig):
        return config.to_dict()
    d = config.to_dict()
    return json.loads(json.dumps(d, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def save_module(model: torch.nn.Module, directory: str | Path, *, base_model: str | None = None,
                task: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s module folder (config, safetensors, mklab_module.json)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "mklab_adapter_config"):
        cfg = dataclasses.replace(model.mklab_adapter_config, inference_mode=True)
        (out / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        save_file(adapter_state_dict(model), str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    else:
        model.save_pretrained(str(out), safe_serialization=True)
    write_meta(out, kind=delta_kind(model), base_model=base_model, task=task, extra=extra)
    return out


def write_meta(directory: Path, *, kind: str, base_model: str | None, task: str | None,
               extra: dict[str, Any] | None = None) -> None:
    meta = {"format": "mklab-module", "version": 1, "kind": kind, "base_model": base_model, "task": task,
            **(extra or {})}
    (Path(directory) / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")


def is_module_folder(path: str | Path) -> bool:
    p = Path(path)
    return (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()


@dataclass
class ModuleFolder:
    """A module folder read from disk: config, mklab metadata, and its tensors (loaded on demand)."""

    path: Path
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type"))

    @property
    def kind(self) -> str:
        return KIND_OF_PEFT_TYPE.get(self.peft_type, self.peft_type.lower())

    @property
    def base_model(self) -> str | None:
        return self.meta.get("base_model") or self.config.get("base_model_name_or_path")

    @property
    def task(self) -> str | None:
        return self.meta.get("task")

    @property
    def name(self) -> str:
        return self.path.name

    def heads(self) -> list[str]:
        return head_names(self.config)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        with safe_open(str(self.path / WEIGHTS_NAME), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    def tensors(self, *, heads: bool = True) -> dict[str, torch.Tensor]:
        hs = self.heads()
        with safe_open(str(self.path / WEIGHTS_NAME), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if heads or not is_head_key(k, hs)}

    def delta_keys(self) -> list[str]:
        hs = self.heads()
        return [k for k in self.shapes() if not is_head_key(k, hs)]


def read_module(path: str | Path) -> ModuleFolder:
    """Read a module folder; a clear error when ``path`` is not one."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"module folder {str(p)!r} does not exist", hint="give a folder written by mklab train --peft")
    if not (p / CONFIG_NAME).is_file():
        raise UserError(f"{str(p)!r} is not a module folder (no {CONFIG_NAME})",
                        hint="train one with mklab train --peft lora|prefix|adapter")
    if not (p / WEIGHTS_NAME).is_file():
        hint = "pickled .bin files are not read; re-save with safetensors" if (p / "adapter_model.bin").exists() else None
        raise UserError(f"module folder {str(p)!r} has no {WEIGHTS_NAME}", hint=hint)
    try:
        config = json.loads((p / CONFIG_NAME).read_text())
        meta = json.loads((p / META_NAME).read_text()) if (p / META_NAME).is_file() else {}
    except json.JSONDecodeError as e:
        raise UserError(f"unreadable JSON in module folder {str(p)!r}: {e}") from None
    return ModuleFolder(p, config, meta)


def _peft_config_from_dict(d: dict[str, Any]):
    from peft import LoraConfig, PrefixTuningConfig

    cls = {"LORA": LoraConfig, "PREFIX_TUNING": PrefixTuningConfig}[d["peft_type"]]
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kw = {k: v for k, v in d.items() if k in names}
    if kw.get("modules_to_save"):
        kw["modules_to_save"] = list(dict.fromkeys(kw["modules_to_save"]))
    return cls(**kw)


def apply_folder_config(model: torch.nn.Module, folder: str | Path | ModuleFolder, *,
                        seed: int = 42) -> torch.nn.Module:
    """A fresh (seeded, untrained) module with the folder's configuration on ``model``: trainable."""
    mf = folder if isinstance(folder, ModuleFolder) else read_module(folder)
    if mf.kind == "adapter":
        cfg = AdapterConfig.from_dict(mf.config)
        cfg.inference_mode = False
    elif mf.kind in ("lora", "prefix"):
        cfg = _peft_config_from_dict(mf.config)
        cfg.inference_mode = False
        if mf.kind == "prefix" and cfg.prefix_projection:
            # the folder holds the projected prefix: train/evaluate it directly (no MLP)
            cfg.prefix_projection = False
    else:
        raise UserError(f"unsupported module type {mf.peft_type!r} in {str(mf.path)!r}",
                        hint="supported: LORA, PREFIX_TUNING, BOTTLENECK_ADAPTER (and PROMPT_TUNING, DEPT to load)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _apply_config(model, cfg)


def attach_module(model: torch.nn.Module, folder: str | Path | ModuleFolder, *, trainable: bool = False,
                  load_head: bool | str = True, seed: int = 42) -> torch.nn.Module:
    """Put the module saved in ``folder`` onto ``model`` (the backbone with its task head).

    ``load_head``: True loads the saved head (error if it does not fit), ``"if_fits"`` loads it only
    when its shape matches (an ensembled or other-task module keeps the fresh head), False never.
    Works for LoRA, prefix and adapter folders, and for PT / DePT folders via mergekit_lab.prompt.
    With ``trainable=False`` the result is in eval mode with nothing trainable.
    """
    mf = folder if isinstance(folder, ModuleFolder) else read_module(folder)
    if mf.kind in ("pt", "dept"):
        from mergekit_lab.prompt.io import load_prompt_module

        return load_prompt_module(model, mf.path, is_trainable=trainable)
    tensors = mf.tensors()
    wrapped = apply_folder_config(model, mf, seed=seed)
    if mf.kind == "adapter":
        if load_head is False:
            tensors = {k: v for k, v in tensors.items() if not is_head_key(k, mf.heads())}
        skipped = load_adapter_state_dict(wrapped, tensors, strict_heads=load_head is True)
    else:
        from peft import set_peft_model_state_dict

        current = module_state_dict(wrapped)
        skipped = []
        for k in list(tensors):
            if k not in current:
                raise UserError(f"tensor {k} of module {str(mf.path)!r} does not fit {type(model).__name__}",
                                hint="load a module on the backbone and task head type it was trained with")
            if is_head_key(k, mf.heads()):
                if load_head is False or (tuple(tensors[k].shape) != tuple(current[k].shape) and load_head != True):  # noqa: E712
                    skipped.append(k)
                    del tensors[k]
            if k in tensors and tuple(tensors[k].shape) != tuple(current[k].shape):
                raise UserError(f"tensor {k} of {str(mf.path)!r} has shape {tuple(tensors[k].shape)}, "
                                f"the model expects {tuple(current[k].shape)}")
        missing = [k for k in current if k not in tensors and not is_head_key(k, mf.heads())]
        if missing:
            raise UserError(f"module {str(mf.path)!r} lacks {len(missing)} tensors, e.g. {missing[0]}")
        for k in current:  # PEFT wants every modules_to_save tensor: keep the model's own head
            tensors.setdefault(k, current[k])
        set_peft_model_state_dict(wrapped, tensors)
    if skipped:
        logger.info("kept the fresh task head (module head does not fit or was not asked for): %s", skipped)
    if not trainable:
        for p in wrapped.parameters():
            p.requires_grad_(False)
        wrapped.eval()
    return wrapped
