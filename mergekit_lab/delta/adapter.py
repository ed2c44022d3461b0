"""The bottleneck (Houlsby) adapter, implemented in the project.

PEFT has no bottleneck adapter and the ``adapters`` library pins an older transformers, so the
adapter lives here: after each attention output projection and each feed-forward output
projection (before the residual and LayerNorm, as in Houlsby et al. 2019) the sub-layer output
``h`` becomes ``h + W_up f(W_down h + b_down) + b_up``. ``W_up`` and ``b_up`` start at zero,
so a fresh adapter is the identity and the model starts exactly at the backbone.

The wrapped layer keeps the original linear as ``base_layer`` (PEFT's convention), so the
adapter tensors are ``<module>.adapter_down.weight`` etc. Folders use PEFT's layout (see
:mod:`mergekit_lab.delta.io`) with ``peft_type: "BOTTLENECK_ADAPTER"``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from mergekit_lab.errors import UserError

ADAPTER_PEFT_TYPE = "BOTTLENECK_ADAPTER"

#: default insertion points (regexes over module names) per model type
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": [r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense"],
    "roberta": [r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense"],
    "xlm-roberta": [r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense"],
    "electra": [r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense"],
    "camembert": [r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense"],
    "distilbert": [r".*\.attention\.out_lin", r".*\.ffn\.lin2"],
    "t5": [r".*\.SelfAttention\.o", r".*\.EncDecAttention\.o", r".*\.DenseReluDense\.wo"],
    "mt5": [r".*\.SelfAttention\.o", r".*\.EncDecAttention\.o", r".*\.DenseReluDense\.wo"],
}
HEAD_NAMES = ("classifier", "score", "qa_outputs")

_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "swish": nn.SiLU}


@dataclass
class AdapterConfig:
    """What ``adapter_config.json`` holds for a bottleneck adapter (PEFT-style keys)."""

    adapter_size: int = 12
    non_linearity: str = "relu"
    target_modules: list[str] = field(default_factory=list)
    modules_to_save: list[str] | None = None
    task_type: str | None = "SEQ_CLS"
    base_model_name_or_path: str | None = None
    init_std: float = 0.02
    inference_mode: bool = False
    peft_type: str = ADAPTER_PEFT_TYPE

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class AdapterLinear(nn.Module):
    """A linear layer followed by a residual bottleneck adapter on its output."""

    def __init__(self, base_layer: nn.Linear, size: int, non_linearity: str, init_std: float = 0.02):
        super().__init__()
        d = base_layer.out_features
        self.base_layer = base_layer
        self.adapter_down = nn.Linear(d, size)
        self.adapter_act = _ACTS[non_linearity]()
        self.adapter_up = nn.Linear(size, d)
        dev, dt = base_layer.weight.device, base_layer.weight.dtype
        self.adapter_down.to(device=dev, dtype=dt)
        self.adapter_up.to(device=dev, dtype=dt)
        with torch.no_grad():
            nn.init.normal_(self.adapter_down.weight, std=init_std)
            nn.init.zeros_(self.adapter_down.bias)
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)

    # models read their projections' weight (T5's DenseReluDense casts to ``wo.weight.dtype``)
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        return h + self.adapter_up(self.adapter_act(self.adapter_down(h)))


def _matches(name: str, patterns: list[str]) -> bool:
    for p in patterns:
        if name == p or name.endswith("." + p) or re.fullmatch(p, name):
            return True
    return False


def default_targets(model: nn.Module) -> list[str]:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in DEFAULT_TARGETS:
        raise UserError(f"no default adapter positions for model type {mt!r}",
                        hint="pass --target-modules with the names of the sub-layer output projections")
    return list(DEFAULT_TARGETS[mt])


def head_modules(model: nn.Module) -> list[str]:
    """Names of the task head modules present on ``model`` (trained and saved with the adapter)."""
    names = dict(model.named_modules())
    return [h for h in HEAD_NAMES if h in names]


def inject_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Insert adapters in place; freeze everything but adapters and the head. Returns ``model``."""
    if not config.target_modules:
        config.target_modules = default_targets(model)
    if config.modules_to_save is None:
        config.modules_to_save = head_modules(model)
    if config.non_linearity not in _ACTS:
        raise UserError(f"unknown adapter non-linearity {config.non_linearity!r}", hint=f"choose {', '.join(_ACTS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, config.target_modules)]
    if not targets:
        raise UserError(f"no linear layer matches the adapter target modules {config.target_modules}",
                        hint="pass --target-modules with names that exist in the model")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, AdapterLinear(getattr(parent, child), config.adapter_size, config.non_linearity,
                                             config.init_std))
    for name, p in model.named_parameters():
        if ".adapter_" in name or any(name.split(".")[0] == h for h in config.modules_to_save):
            p.requires_grad_(True)
    model.mklab_adapter_config = config  # marks the model as adapter-wrapped
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter and head tensors under PEFT-style names (``base_model.model.<module>.adapter_up.weight``)."""
    cfg: AdapterConfig = model.mklab_adapter_config
    heads = tuple(cfg.modules_to_save or ())
    out = {}
    for name, t in model.state_dict().items():
        if ".adapter_" in name or name.split(".")[0] in heads:
            out["base_model.model." + name] = t.detach().cpu().contiguous().clone()
    return out


def load_adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], *, strict_heads: bool = True) -> list[str]:
    """Copy saved adapter (and head) tensors into an adapter-wrapped model; returns skipped head keys."""
    own = model.state_dict()
    skipped = []
    wanted = {k for k in adapter_state_dict(model)}
    missing = sorted(k for k in wanted if k not in tensors and ".adapter_" in k)
    if missing:
        raise UserError(f"adapter folder lacks {len(missing)} tensors, e.g. {missing[0]}",
                        hint="load it on the backbone and adapter positions it was trained with")
    with torch.no_grad():
        for key, t in tensors.items():
            name = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
            if name not in own:
                raise UserError(f"adapter tensor {key} does not fit the model", hint="same backbone and positions needed")
            if tuple(own[name].shape) != tuple(t.shape):
                if ".adapter_" not in name and not strict_heads:
                    skipped.append(key)
                    continue
                raise UserError(f"tensor {key} has shape {tuple(t.shape)}, the model expects {tuple(own[name].shape)}")
            model.get_parameter(name).copy_(t.to(own[name].dtype)) if name in dict(model.named_parameters()) \
                else model.get_buffer(name).copy_(t)
    return skipped
