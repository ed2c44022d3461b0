"""The streaming merge engine.

:func:`merge_models` merges K checkpoints (model folders, weight files or in-memory state dicts)
tensor by tensor with any registered method. Per output tensor it reads one tensor of each
input (and of the base model and of each model's statistics), computes the merged tensor in
float32 (float64 inside RegMean/Fisher), casts it to the inputs' dtype and appends it to the
output shard being written, so peak memory is about one tensor per input plus one output
tensor whatever the model size. Everything is checked (architecture, names, shapes, vocabulary,
heads, label masks, statistics) before any tensor is merged.

Heads (see :func:`mergekit_lab.merging.checks.head_names`):

- ``heads="merge"``: every parameter, heads included, is merged into one model (same label
  space required). With ``label_masks`` (one boolean vector per model over the head's labels,
  e.g. which emotions a domain annotates), each output row of the final head layer is merged only
  over the models whose data annotate that label (a label annotated by none is averaged).
- ``heads="keep"``: the body is merged once and written into one loadable model folder per input
  model, ``<output_dir>/<name_i>/``, holding the merged body, model i's own head, config and
  tokenizer files, so ``from_pretrained`` / ``mklab eval`` work on each task unchanged.

Every output folder gets ``mklab_merge.json`` describing the merge.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_lab.errors import UserError
from mergekit_lab.merging._progress import log, track
from mergekit_lab.merging.checks import base_model_prefix, check_compatible, head_names, read_config
from mergekit_lab.merging.io import (
    DictSource,
    ShardedSafetensorsWriter,
    TensorInfo,
    TensorSource,
    open_checkpoint,
)
from mergekit_lab.merging.registry import MergeMethod, MergeNotes, MergeParams, TensorJob, make_method
from mergekit_lab.merging.statistics import StatisticsFile

_SKIP_COPY = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.index\.json|\.tmp|^results\.json|^mklab_merge\.json|^training_args.*)$")
_COPY_DIRS_SKIP = {"mklab_stats", "checkpoints", "runs"}

ModelRef = str | Path | TensorSource | dict


@dataclass
class MergeResult:
    """What a merge produced: output folders (or state dicts when in memory) and a report."""

    outputs: dict[str, Path] = field(default_factory=dict)
    state_dicts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


class _DictSink:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def write(self, name: str, t: torch.Tensor) -> None:
        self.tensors[name] = t.clone()

    def close(self) -> list[str]:
        return []


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/inf in ``t``. The float32 sum is non-finite whenever an entry is (one cheap pass);
    only then (or on an overflow of the sum itself) is every entry checked."""
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def _open(ref: ModelRef, i: int) -> tuple[TensorSource, dict[str, Any], Path | None]:
    if isinstance(ref, TensorSource):
        return ref, {}, None
    if isinstance(ref, dict):
        return DictSource(ref, label=f"<model {i}>"), {}, None
    p = Path(ref)
    return open_checkpoint(p), read_config(p), (p if p.is_dir() else None)


def _unique_names(paths: list[Path | None], names: list[str] | None, k: int) -> list[str]:
    if names:
        if len(names) != k or len(set(names)) != k:
            raise UserError(f"give {k} distinct output names for the kept heads, got {names}")
        return list(names)
    out: list[str] = []
    for i, p in enumerate(paths):
        base = p.name if p is not None else f"model{i}"
        nm, j = base, 1
        while nm in out:
            j += 1
            nm = f"{base}-{j}"
        out.append(nm)
    return out


def _map_base_key(name: str, base: TensorSource, prefix: str | None) -> str | None:
    if name in base:
        return name
    if prefix and name.startswith(prefix + "."):
        short = name[len(prefix) + 1 :]
        if short in base:
            return short
    if prefix and f"{prefix}.{name}" in base:
        return f"{prefix}.{name}"
    return None


def _copy_side_files(src: Path | None, dst: Path) -> None:
    if src is None:
        return
    for f in src.iterdir():
        if f.is_file() and not _SKIP_COPY.search(f.name):
            shutil.copy2(f, dst / f.name)
        elif f.is_dir() and f.name not in _COPY_DIRS_SKIP and not f.name.startswith("."):
            shutil.copytree(f, dst / f.name, dirs_exist_ok=True)


def merge_models(
    models: list[ModelRef],
    method: str | MergeMethod = "average",
    params: dict[str, Any] | MergeParams | None = None,
    *,
    output_dir: str | Path | None = None,
    base_model: ModelRef | None = None,
    weights: list[float] | None = None,
    statistics: list[str | Path | StatisticsFile | None] | None = None,
    heads: str = "merge",
    label_masks: list[list[bool]] | None = None,
    head_prefixes: list[str] | None = None,
    names: list[str] | None = None,
    max_shard_size: int | str = "2GB",
    out_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> MergeResult:
    """Merge ``models`` with ``method``; write to ``output_dir`` (streaming) or return state
    dicts when ``output_dir`` is None. See the module docstring for heads and outputs."""
    t_start = time.perf_counter()
    m = method if isinstance(method, MergeMethod) else make_method(method, params)
    k = len(models)
    if k < m.min_models:
        raise UserError(f"merge method {m.name!r} needs at least {m.min_models} models, got {k}",
                        hint="give more paths after --models")
    if m.max_models is not None and k > m.max_models:
        raise UserError(f"merge method {m.name!r} merges exactly {m.max_models} models, got {k}")
    if heads not in ("merge", "keep"):
        raise UserError(f"unknown heads mode {heads!r}", hint="use merge or keep")
    if m.needs_base and base_model is None:
        raise UserError(f"merge method {m.name!r} needs the pretrained base model", hint="give --base-model")
    w = [1.0] * k if weights is None else [float(x) for x in weights]
    if len(w) != k:
        raise UserError(f"{len(w)} weights given for {k} models", hint="give one weight per model")
    if any(x < 0 for x in w) and m.name in ("average", "regmean", "fisher"):
        raise UserError(f"negative merge weight in {w}", hint="weights must be >= 0")

    opened = [_open(r, i) for i, r in enumerate(models)]
    sources = [o[0] for o in opened]
    configs = [o[1] for o in opened]
    paths = [o[2] for o in opened]
    head_sets = [head_names(s.keys(), c, head_prefixes) for s, c in zip(sources, configs, strict=True)]
    check_compatible(sources, configs, heads, head_sets)

    base_src = None
    base_prefix = base_model_prefix(configs[0])
    if base_model is not None and (m.needs_base):
        base_src, _, _ = _open(base_model, -1)

    # statistics
    stats_files: list[StatisticsFile | None] | None = None
    if m.stats_kind is not None:
        if statistics is None or len(statistics) != k or any(s is None for s in statistics):
            raise UserError(f"merge method {m.name!r} needs {m.stats_kind} statistics for each of the {k} models")
        stats_files = [s if isinstance(s, StatisticsFile) else StatisticsFile(s) for s in statistics]
        for sf in stats_files:
            if sf.kind != m.stats_kind:
                raise UserError(f"{sf.path} holds {sf.kind!r} statistics, method {m.name!r} needs {m.stats_kind!r}")
            sf.check_finite()
    context: dict[str, Any] = {}
    if m.name == "fisher" and getattr(m.params, "normalization", "none") == "per_model":
        context["fisher_global_norms"] = [sf.global_norm() for sf in stats_files]
    m.prepare(context)

    ref = sources[0]
    body = [n for n in ref.keys() if n not in head_sets[0]]
    merged_names = body + ([n for n in ref.keys() if n in head_sets[0]] if heads == "merge" else [])

    # label masks (multi-label heads)
    row_groups: dict[str, list[tuple[list[int], list[int]]]] = {}
    if label_masks is not None:
        if heads != "merge":
            log("label masks are ignored with heads=keep (each task keeps its own head)")
        elif len(label_masks) != k:
            raise UserError(f"{len(label_masks)} label masks given for {k} models")
        else:
            n_labels = len(label_masks[0])
            if any(len(x) != n_labels for x in label_masks):
                raise UserError("label masks have different lengths", hint="one entry per head output")
            for n in head_sets[0]:
                shp = ref.info(n).shape
                if len(shp) in (1, 2) and shp[0] == n_labels:
                    groups: dict[tuple[int, ...], list[int]] = {}
                    for j in range(n_labels):
                        who = tuple(i for i in range(k) if label_masks[i][j]) or tuple(range(k))
                        groups.setdefault(who, []).append(j)
                    row_groups[n] = [(list(who), rows) for who, rows in groups.items()]
            if not row_groups:
                raise UserError(f"no head parameter has {n_labels} output rows to apply the label masks to")

    # plan outputs
    def out_info(n: str, src: TensorSource) -> TensorInfo:
        info = src.info(n)
        if out_dtype is not None and info.dtype.is_floating_point:
            return TensorInfo(info.shape, out_dtype)
        return info

    out_names = ["merged"] if heads == "merge" else _unique_names(paths, names, k)
    plans: list[list[tuple[str, TensorInfo]]] = []
    if heads == "merge":
        plans.append([(n, out_info(n, ref)) for n in merged_names])
    else:
        for i in range(k):
            plans.append([(n, out_info(n, ref)) for n in body] + [(n, out_info(n, sources[i])) for n in sources[i].keys() if n in head_sets[i]])
    out_root = Path(output_dir) if output_dir is not None else None
    sinks: list[Any] = []
    out_dirs: list[Path] = []
    for i, plan in enumerate(plans):
        if out_root is None:
            sinks.append(_DictSink())
        else:
            d = out_root if heads == "merge" else out_root / out_names[i]
            out_dirs.append(d)
            sinks.append(ShardedSafetensorsWriter(d, plan, max_shard_size, metadata={"mklab": f"merge:{m.name}"}))

    # stream
    notes = MergeNotes()
    t_merge = time.perf_counter()
    base_keys_missing: list[str] = []
    for n in track(merged_names, len(merged_names), f"merging ({m.name})", enabled=progress):
        info = ref.info(n)
        if not info.dtype.is_floating_point:
            out = sources[0].get(n)  # integer buffers (position ids): copied from the first model
            notes.count("copied_non_float")
        else:
            # one input tensor at a time in its stored dtype; only the float32 copies stay alive
            tensors = [s.get(n) if m.raw_inputs else s.get(n).float() for s in sources]
            base_t = None
            if base_src is not None:
                bk = _map_base_key(n, base_src, base_prefix)
                if bk is None:
                    base_keys_missing.append(n)
                else:
                    base_t = base_src.get(bk) if m.raw_inputs else base_src.get(bk).float()
                    if base_t.shape != tensors[0].shape:
                        raise UserError(f"base model tensor {bk!r} is {list(base_t.shape)}, the models have {list(tensors[0].shape)}",
                                        hint="give the pretrained model the others were fine-tuned from")
            stats, layout = None, None
            if stats_files is not None:
                if m.stats_kind == "grams":
                    mod = n[: -len(".weight")] if n.endswith(".weight") else None
                    if mod is not None and any(mod in sf for sf in stats_files):
                        stats = [sf.get(mod) if mod in sf else None for sf in stats_files]
                        layout = stats_files[0].layout(mod)
                else:
                    if any(n in sf for sf in stats_files):
                        stats = [sf.get(n) if n in sf else None for sf in stats_files]
            if n in row_groups:
                out = torch.empty_like(tensors[0])
                for who, rows in row_groups[n]:
                    if layout == "conv1d":
                        raise UserError(f"label masks cannot be applied to the Conv1D head {n!r}")
                    r = torch.tensor(rows)
                    fstats = None
                    if stats is not None:
                        fstats = [stats[i] if m.stats_kind == "grams" else (stats[i][r] if stats[i] is not None else None) for i in who]
                    job = TensorJob(
                        name=n, tensors=[tensors[i][r] for i in who], weights=[w[i] for i in who], models=list(who),
                        base=base_t[r] if base_t is not None else None, stats=fstats, layout=layout, notes=notes,
                    )
                    out[r] = m.merge(job)
                notes.count("label_masked_rows")
            else:
                job = TensorJob(name=n, tensors=tensors, weights=list(w), models=list(range(k)), base=base_t,
                                stats=stats, layout=layout, notes=notes)
                out = m.merge(job)
            if not _all_finite(out):
                raise UserError(f"the merge of {n!r} produced NaN/inf", hint="check the inputs and method parameters")
            out = out.to(out_dtype if out_dtype is not None else info.dtype)
        for sink in sinks:
            sink.write(n, out)
        del out
    if heads == "keep":
        for i, sink in enumerate(sinks):
            for n in sources[i].keys():
                if n in head_sets[i]:
                    t = sources[i].get(n)
                    sink.write(n, t.to(out_dtype) if out_dtype is not None and t.is_floating_point() else t)
    files = [s.close() for s in sinks]
    merge_seconds = time.perf_counter() - t_merge
    if base_keys_missing:
        notes.extra["not_in_base_model"] = base_keys_missing[:50]

    report: dict[str, Any] = {
        "method": m.name,
        "params": m.params.model_dump(by_alias=True),
        "n_models": k,
        "models": [s.label for s in sources],
        "weights": w,
        "base_model": base_src.label if base_src is not None else None,
        "heads": heads,
        "head_parameters": sorted(head_sets[0]),
        "label_masks": label_masks,
        "statistics": [
            {"path": str(sf.path), **{kk: sf.metadata.get(kk) for kk in ("kind", "variant", "variant_effective", "n_examples", "padding", "dtype", "version")}}
            for sf in (stats_files or [])
        ],
        "notes": notes.as_dict(),
        "merge_seconds": merge_seconds,
        "total_seconds": time.perf_counter() - t_start,
    }
    if notes.ridge:
        log(f"RegMean used a ridge on {len(notes.ridge)} layer(s) whose Gram sum was not positive definite")
    result = MergeResult(report=report)
    if out_root is None:
        for nm, sink in zip(out_names, sinks, strict=True):
            result.state_dicts[nm] = sink.tensors
    else:
        for i, (nm, d) in enumerate(zip(out_names, out_dirs, strict=True)):
            src_dir = paths[0] if heads == "merge" else paths[i]
            _copy_side_files(src_dir, d)
            (d / "mklab_merge.json").write_text(json.dumps({**report, "output": nm, "files": files[i]}, indent=2, default=str) + "\n")
            result.outputs[nm] = d
    for s in sources:
        s.close()
    return result
