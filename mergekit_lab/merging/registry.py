"""Registry of merge methods.

A merge method is a small class with a pydantic ``Params`` model and a ``merge(job)`` method
that combines one tensor from each input model. Register it with::

    @register_method("my_method")
    class MyMethod(MergeMethod):
        '''One-line summary. Reference: ...'''
        Params = MyParams
        def merge(self, job): ...

The CLI help, config validation and docs list the registered methods and their parameters
from this registry (:func:`list_methods`, :func:`method_help`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from mergekit_lab.errors import UserError


class MergeParams(BaseModel):
    """Base class of a method's parameters (unknown keys are an error)."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class MergeNotes:
    """What happened during a merge, reported in results.json (ridge fallbacks, fallbacks to
    averaging, counts per treatment)."""

    ridge: dict[str, float] = field(default_factory=dict)
    averaged_fallback: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def as_dict(self) -> dict[str, Any]:
        return {
            "ridge_fallbacks": dict(self.ridge),
            "averaged_without_statistics": list(self.averaged_fallback)[:50],
            "n_averaged_without_statistics": len(self.averaged_fallback),
            "counts": dict(self.counts),
            **self.extra,
        }


@dataclass
class TensorJob:
    """One output tensor to compute.

    ``tensors`` holds the inputs' tensors in float32 (one per model in ``models``; in their stored
    dtype, e.g. bf16, for methods with ``raw_inputs = True``, which then must not modify them), ``weights``
    the per-model coefficients (not normalised), ``base`` the base model's tensor (float32) or
    None, ``stats`` the per-model statistic for this tensor (a Gram matrix of the layer's input
    for RegMean, a Fisher diagonal for Fisher) or None when not available, ``layout`` how a
    linear weight is stored ("linear": (d_out, d_in); "conv1d": (d_in, d_out)).
    """

    name: str
    tensors: list[torch.Tensor]
    weights: list[float]
    models: list[int]
    base: torch.Tensor | None = None
    stats: list[torch.Tensor] | None = None
    layout: str | None = None
    notes: MergeNotes = field(default_factory=MergeNotes)

    def normalized_weights(self) -> list[float]:
        s = float(sum(self.weights))
        if s == 0:
            raise UserError(f"merge weights of tensor {self.name} sum to zero", hint="give positive --weights")
        return [w / s for w in self.weights]


class MergeMethod:
    """Base class of merge methods. Subclasses set the class attributes and ``merge``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[MergeParams]] = MergeParams
    needs_base: ClassVar[bool] = False
    #: "grams" (RegMean), "fisher" or None (data-free)
    stats_kind: ClassVar[str | None] = None
    min_models: ClassVar[int] = 2
    max_models: ClassVar[int | None] = None
    #: True: ``job.tensors``/``job.base`` come in their stored dtype (bf16 stays bf16), so the
    #: method converts what it needs, e.g. chunk by chunk, instead of holding float32 copies
    raw_inputs: ClassVar[bool] = False

    def __init__(self, params: MergeParams | None = None):
        self.params = params if params is not None else self.Params()

    def prepare(self, context: dict[str, Any]) -> None:
        """Called once before streaming, e.g. to compute global statistics norms."""

    def merge(self, job: TensorJob) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else cls.name


_METHODS: dict[str, type[MergeMethod]] = {}


def register_method(name: str) -> Callable[[type[MergeMethod]], type[MergeMethod]]:
    """Class decorator: register a :class:`MergeMethod` subclass under ``name``."""

    def deco(cls: type[MergeMethod]) -> type[MergeMethod]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"merge method {name!r} registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def _ensure_loaded() -> None:
    from mergekit_lab.merging import methods  # noqa: F401  (registers the built-in methods)


def list_methods() -> list[str]:
    _ensure_loaded()
    return sorted(_METHODS)


def get_method_class(name: str) -> type[MergeMethod]:
    _ensure_loaded()
    if name not in _METHODS:
        raise UserError(f"unknown merge method {name!r}", hint=f"choose one of: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def make_method(name: str, params: dict[str, Any] | MergeParams | None = None) -> MergeMethod:
    """Instantiate a registered method with validated parameters (UserError on bad ones)."""
    cls = get_method_class(name)
    if isinstance(params, MergeParams):
        if not isinstance(params, cls.Params):
            raise UserError(f"parameters of type {type(params).__name__} do not belong to method {name!r}")
        return cls(params)
    try:
        p = cls.Params(**(params or {}))
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        allowed = ", ".join(f.alias or k for k, f in cls.Params.model_fields.items()) or "(none)"
        raise UserError(f"bad parameters for merge method {name!r}: {errs}", hint=f"its parameters are: {allowed}") from None
    return cls(p)


def method_help() -> str:
    """One line per method with its parameters and defaults (for --help and docs)."""
    _ensure_loaded()
    lines = []
    for name in sorted(_METHODS):
        cls = _METHODS[name]
        ps = ", ".join(
            f"{f.alias or k}={f.default!r}" for k, f in cls.Params.model_fields.items()
        )
        extra = " [needs --base-model]" if cls.needs_base else ""
        lines.append(f"{name}({ps}){extra}: {cls.summary()}")
    return "\n".join(lines)
