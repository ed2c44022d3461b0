"""Compatibility checks run before any merge work, and head-parameter detection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergekit_lab.errors import UserError
from mergekit_lab.merging.io import TensorSource


def read_config(model_dir: str | Path | None) -> dict[str, Any]:
    """config.json of a model folder ({} when absent or when given a bare weight file)."""
    if model_dir is None:
        return {}
    p = Path(model_dir)
    if p.is_dir() and (p / "config.json").exists():
        return json.loads((p / "config.json").read_text())
    return {}


def base_model_prefix(config: dict[str, Any]) -> str | None:
    """The transformers ``base_model_prefix`` of the config's architecture (e.g. "bert")."""
    archs = config.get("architectures") or []
    if not archs:
        return None
    try:
        import transformers

        cls = getattr(transformers, archs[0], None)
    except Exception:  # pragma: no cover
        cls = None
    prefix = getattr(cls, "base_model_prefix", None) if cls is not None else None
    return prefix or None


def head_names(keys: list[str], config: dict[str, Any], head_prefixes: list[str] | None = None) -> set[str]:
    """Parameters of the task head: those outside the base model (``base_model_prefix``), or
    those starting with one of ``head_prefixes`` when given. A bare base model has no head."""
    if head_prefixes:
        return {k for k in keys if any(k == p or k.startswith(p.rstrip(".") + ".") for p in head_prefixes)}
    prefix = base_model_prefix(config)
    if not prefix or not any(k.startswith(prefix + ".") for k in keys):
        return set()
    return {k for k in keys if not k.startswith(prefix + ".")}


def _vocab(config: dict[str, Any]) -> int | None:
    v = config.get("vocab_size")
    if v is None and isinstance(config.get("text_config"), dict):
        v = config["text_config"].get("vocab_size")
    return v


def check_compatible(
    sources: list[TensorSource],
    configs: list[dict[str, Any]],
    heads: str,
    head_sets: list[set[str]],
) -> None:
    """Raise UserError naming the first mismatch in architecture, vocabulary, parameter names
    or shapes. Under ``heads=keep`` head parameters may differ; under ``merge`` they must match."""
    ref_cfg, ref = configs[0], sources[0]
    for i in range(1, len(sources)):
        cfg, src = configs[i], sources[i]
        if ref_cfg and cfg:
            if ref_cfg.get("model_type") != cfg.get("model_type"):
                raise UserError(
                    f"different architectures: {ref.label} is {ref_cfg.get('model_type')!r}, "
                    f"{src.label} is {cfg.get('model_type')!r}",
                    hint="merge only models fine-tuned from the same pretrained model",
                )
            va, vb = _vocab(ref_cfg), _vocab(cfg)
            if va != vb:
                raise UserError(
                    f"different vocabulary sizes: {ref.label} has {va}, {src.label} has {vb}",
                    hint="merge only models sharing one tokenizer/vocabulary",
                )
            if heads == "merge" and (ref_cfg.get("architectures") != cfg.get("architectures")):
                raise UserError(
                    f"different model classes: {ref.label} is {ref_cfg.get('architectures')}, "
                    f"{src.label} is {cfg.get('architectures')}",
                    hint="use --heads keep to give each task its own head",
                )
        body_a = [k for k in ref.keys() if k not in head_sets[0]]
        body_b = {k for k in src.keys() if k not in head_sets[i]}
        for k in body_a:
            if k not in body_b:
                raise UserError(f"parameter {k!r} of {ref.label} is missing from {src.label}",
                                hint="the models do not share an architecture")
        extra = sorted(body_b - set(body_a))
        if extra:
            raise UserError(f"parameter {extra[0]!r} of {src.label} is missing from {ref.label}",
                            hint="the models do not share an architecture")
        for k in body_a:
            a, b = ref.info(k).shape, src.info(k).shape
            if a != b:
                what = "vocabulary sizes differ" if ("embed" in k or "wte" in k or "shared" in k) else "shapes differ"
                raise UserError(f"{what}: {k!r} is {list(a)} in {ref.label} but {list(b)} in {src.label}",
                                hint="merge only models fine-tuned from the same pretrained model")
        if heads == "merge":
            ha, hb = sorted(head_sets[0]), sorted(head_sets[i])
            if ha != hb:
                raise UserError(f"the task heads differ: {ha} in {ref.label} vs {hb} in {src.label}",
                                hint="use --heads keep to keep each task's own head")
            for k in ha:
                a, b = ref.info(k).shape, src.info(k).shape
                if a != b:
                    raise UserError(
                        f"head parameter {k!r} is {list(a)} in {ref.label} but {list(b)} in {src.label} "
                        "(different label spaces)",
                        hint="use --heads keep to keep each task's own head",
                    )
