"""Weighted ensembling of delta-module folders (the merge step of Lv et al. 2023).

``theta^k = sum_j w_j theta_j^k`` for every delta tensor ``k`` (the original). For LoRA the
``exact`` option averages the product deltas instead: ``W = sum_j w_j s_j B_j A_j`` with
``s_j = alpha_j / r_j``, re-factorised to the output rank by truncated SVD
(``A' = sqrt(S_r) V_r^T``, ``B' = U_r sqrt(S_r) / s``). Averaging A and B separately, as PEFT's
linear combination does, gives ``sum_ij w_i w_j B_i A_j`` with cross terms instead.

Task heads are not ensembled (sources have their own label spaces): the output folder holds the
delta tensors only, and ``mklab train --peft-init`` puts a fresh head for the target on it.

Hook for ``mklab merge`` when its inputs are module folders (in ``run_merge``, inside its RunOutput)::

    from mergekit_lab.similarity.ensemble import is_module_pool, run_module_merge
    if is_module_pool(settings.model.models):
        res = run_module_merge(settings, out.tmp_dir)      # the module folder is the output folder
    else:
        res = run_merge_experiment(settings, out.tmp_dir)

(:func:`ensemble_modules` is the library call underneath.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mergekit_lab.delta.modules import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ModuleFolder,
    is_module_folder,
    read_module,
    write_meta,
)
from mergekit_lab.errors import UserError
from mergekit_lab.similarity.weights import match_pool, read_weights_file, tensor_weights

_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "spiece.model")


def is_module_pool(models: list[str | Path]) -> bool:
    """True when every input is a module folder (adapter_config.json + safetensors); error on a mix."""
    flags = [is_module_folder(m) for m in models]
    if any(flags) and not all(flags):
        odd = [str(m) for m, f in zip(models, flags) if not f]
        raise UserError(f"cannot mix module folders and full models: {', '.join(odd)} are not module folders",
                        hint="merge either full model folders or PEFT module folders")
    return bool(flags) and all(flags)


def _backbone(mf: ModuleFolder) -> str | None:
    b = mf.base_model
    if b and not b.startswith("builtin:") and Path(b).exists():
        return str(Path(b).resolve())
    return b


def module_family(mf: ModuleFolder) -> str:
    """``text-to-text`` for modules of encoder-decoder LMs (T5, task_type SEQ_2_SEQ_LM), else ``classifier``."""
    return "text-to-text" if str(mf.config.get("task_type")) == "SEQ_2_SEQ_LM" else "classifier"


def check_pool(folders: list[ModuleFolder]) -> None:
    """Same module family, type, backbone and delta tensor shapes everywhere; else a clear error."""
    first = folders[0]
    for mf in folders[1:]:
        if module_family(mf) != module_family(first):
            t2t, cls = (first, mf) if module_family(first) == "text-to-text" else (mf, first)
            raise UserError(f"mixed module families: {t2t.name} is a text-to-text module "
                            f"({t2t.config.get('task_type')}, e.g. T5 on a t2t/ task), {cls.name} is a "
                            f"classifier module ({cls.config.get('task_type')})",
                            hint="score and ensemble modules of one backbone and task family")
        if mf.kind != first.kind:
            raise UserError(f"mixed module types: {first.name} is {first.kind}, {mf.name} is {mf.kind}",
                            hint="ensemble modules of one type (all lora, all prefix or all adapter)")
        if _backbone(mf) and _backbone(first) and _backbone(mf) != _backbone(first):
            raise UserError(f"mixed backbones: {first.name} was trained on {first.base_model}, "
                            f"{mf.name} on {mf.base_model}", hint="ensemble modules of one backbone")
    ref = {k: v for k, v in first.shapes().items() if k in set(first.delta_keys())}
    for mf in folders[1:]:
        shp = {k: v for k, v in mf.shapes().items() if k in set(mf.delta_keys())}
        if set(shp) != set(ref):
            diff = sorted(set(shp) ^ set(ref))
            raise UserError(f"modules {first.name} and {mf.name} have different tensors (e.g. {diff[0]})",
                            hint="ensemble modules with the same configuration (target modules, positions)")
        for k, s in shp.items():
            if s != ref[k]:
                raise UserError(f"tensor {k} has shape {s} in {mf.name} but {ref[k]} in {first.name}",
                                hint="ensemble modules with the same rank / size / prefix length")


def _lora_scale(cfg: dict[str, Any], r: int | None = None) -> float:
    r = r or int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", r))
    return alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r


def exact_lora_factors(As: list[torch.Tensor], Bs: list[torch.Tensor], scales: list[float], weights: list[float],
                       rank: int, out_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A', B', W): W = sum_j w_j s_j B_j A_j and its rank-``rank`` factors with out_scale * B' A' ~ W."""
    W = sum(w * s * (B.double() @ A.double()) for A, B, s, w in zip(As, Bs, scales, weights))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    A_new = root[:, None] * Vh[:r]
    B_new = U[:, :r] * root[None, :] / out_scale
    if r < rank:  # pad with zeros so the folder keeps the configured rank
        A_new = torch.cat([A_new, A_new.new_zeros(rank - r, A_new.shape[1])])
        B_new = torch.cat([B_new, B_new.new_zeros(B_new.shape[0], rank - r)], dim=1)
    return A_new, B_new, W


def ensemble_modules(models: list[str | Path], output_dir: str | Path, *, weights: list[float] | None = None,
                     weights_file: str | Path | None = None, lora_exact: bool = False, rank: int | None = None,
                     copy_side_files: bool = True) -> dict[str, Any]:
    """Write the weighted ensemble of module folders ``models`` into ``output_dir``; returns a report.

    ``weights``: one per model (normalised to sum 1; default uniform), or ``weights_file``: a
    weights.json from ``mklab similarity`` (its granularity applies per tensor; sources excluded
    there, such as the target's own module, get weight 0). ``lora_exact`` averages the LoRA
    product deltas and re-factorises them to ``rank`` (default: the sources' rank).
    """
    if not models:
        raise UserError("no module folders to ensemble")
    folders = [read_module(m) for m in models]
    check_pool(folders)
    kind = folders[0].kind
    if kind in ("pt", "dept"):
        raise UserError("prompt modules are not ensembled here", hint="ensemble lora, prefix or adapter modules")
    if weights is not None and weights_file is not None:
        raise UserError("give either per-model weights or a weights file, not both")
    wdata = read_weights_file(weights_file) if weights_file is not None else None
    names: list[str | None]
    if wdata is not None:
        names = match_pool(wdata, [f.path for f in folders], where=f"weights file {str(weights_file)!r}")
    else:
        if weights is None:
            weights = [1.0] * len(folders)
        if len(weights) != len(folders):
            raise UserError(f"{len(weights)} weights for {len(folders)} modules", hint="give one weight per module")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise UserError("ensemble weights must be >= 0 and not all zero")
        names = [f"m{i}" for i in range(len(folders))]
        flat = {f"m{i}": float(w) / sum(weights) for i, w in enumerate(weights)}
    keep = [i for i, n in enumerate(names) if n is not None]
    if not keep:
        raise UserError("every module is excluded by the weights file")

    def weights_for(key: str) -> list[float]:
        if wdata is None:
            w = [flat[names[i]] for i in keep]  # type: ignore[index]
        else:
            table = tensor_weights(wdata, key)
            w = [float(table.get(names[i], 0.0)) for i in keep]  # type: ignore[arg-type]
        s = sum(w)
        if s <= 0:
            raise UserError(f"the weights of tensor {key} sum to zero")
        return [x / s for x in w]

    delta_keys = folders[keep[0]].delta_keys()
    tensors = [folders[i].tensors(heads=False) for i in keep]
    cfg = json.loads(json.dumps(folders[keep[0]].config))
    out: dict[str, torch.Tensor] = {}
    exact_modules = 0
    if lora_exact:
        if kind != "lora":
            raise UserError(f"the exact option is for LoRA modules, not {kind}")
        cfgs = [folders[i].config for i in keep]
        if any(c.get("rank_pattern") or c.get("alpha_pattern") for c in cfgs):
            raise UserError("exact LoRA ensembling does not support rank_pattern / alpha_pattern")
        r_out = int(rank or cfg["r"])
        out_scale = _lora_scale(cfg, r_out)
        scales = [_lora_scale(c) for c in cfgs]
        for key in delta_keys:
            if ".lora_A." not in key:
                continue
            bkey = key.replace(".lora_A.", ".lora_B.")
            w = weights_for(key)
            A_new, B_new, _ = exact_lora_factors([t[key] for t in tensors], [t[bkey] for t in tensors], scales, w,
                                                 r_out, out_scale)
            dtype = tensors[0][key].dtype
            out[key], out[bkey] = A_new.to(dtype).contiguous(), B_new.to(dtype).contiguous()
            exact_modules += 1
        cfg["r"] = r_out
    for key in delta_keys:
        if key in out:
            continue
        w = weights_for(key)
        acc = sum(wi * t[key].double() for wi, t in zip(w, tensors))
        out[key] = acc.to(tensors[0][key].dtype).contiguous()
    dst = Path(output_dir)
    dst.mkdir(parents=True, exist_ok=True)
    cfg["inference_mode"] = True
    (dst / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(out, str(dst / WEIGHTS_NAME), metadata={"format": "pt"})
    if wdata is None:
        used = {str(folders[i].path): flat[names[i]] for i in keep}  # type: ignore[index]
    else:
        used = {str(folders[i].path): float(wdata["weights"].get(names[i], 0.0)) for i in keep}  # type: ignore[arg-type]
    report = {"kind": kind, "method": "lora_exact" if lora_exact else "average", "rank": cfg.get("r"),
              "granularity": wdata["granularity"] if wdata else "model", "weights": used,
              "excluded": [str(folders[i].path) for i, n in enumerate(names) if n is None],
              "tensors": len(out), "exact_lora_modules": exact_modules, "heads": "dropped (fresh head at --peft-init)"}
    write_meta(dst, kind=kind, base_model=folders[keep[0]].base_model, task=None,
               extra={"ensemble": report, "measure": wdata.get("measure") if wdata else None,
                      "target": wdata.get("target") if wdata else None})
    if copy_side_files:
        for name in _SIDE_FILES:
            src = folders[keep[0]].path / name
            if src.is_file():
                shutil.copy2(src, dst / name)
    return report


def _plain_weights(path: Path, folders: list[Path]) -> list[float]:
    """A merge weights file that is a list (one per model) or a mapping folder name/path -> weight."""
    data = json.loads(path.read_text())
    if isinstance(data, list):
        return [float(x) for x in data]
    if isinstance(data, dict) and "format" not in data:
        out = []
        for f in folders:
            for key in (str(f), str(f.resolve()), f.name):
                if key in data:
                    out.append(float(data[key]))
                    break
            else:
                raise UserError(f"weights file {str(path)!r} has no weight for module {str(f)!r}",
                                hint=f"keys: {', '.join(map(str, data))}")
        if len(data) != len(folders):
            raise UserError(f"weights file {str(path)!r} names {len(data)} models, {len(folders)} were given")
        return out
    raise UserError(f"weights file {str(path)!r} is neither a list, a mapping nor an mklab similarity weights file")


def run_module_merge(settings, output_dir: str | Path) -> dict[str, Any]:
    """``mklab merge`` on module folders: the ensembled module goes into ``output_dir`` itself.

    Only ``--method average`` applies (per-tensor weighted average); ``--method-params
    '{exact: true, rank: 8}'`` selects the exact LoRA product-delta ensembling. ``--weights`` is a
    weights.json from ``mklab similarity`` or a plain list / mapping. Returns the dict shape of
    the merge experiment (rows, metrics, extra); no evaluation (the module is an initialisation).
    """
    methods = list(settings.merge.method)
    if methods != ["average"]:
        raise UserError(f"module folders are ensembled with --method average, not {', '.join(methods)}",
                        hint="pass --method average (and --method-params '{exact: true}' for exact LoRA)")
    params = dict(settings.merge.method_params or {})
    params = params.get("average", params) if isinstance(params.get("average"), dict) else params
    unknown = sorted(set(params) - {"exact", "rank"})
    if unknown:
        raise UserError(f"unknown parameter(s) {', '.join(unknown)} for ensembling module folders",
                        hint="module ensembling takes exact (bool, LoRA only) and rank (int)")
    models = [Path(m) for m in settings.model.models]
    weights, weights_file = None, None
    wpath = settings.merge.weights
    if wpath is not None:
        wpath = Path(wpath)
        try:
            raw = json.loads(wpath.read_text())
        except FileNotFoundError:
            raise UserError(f"weights file {str(wpath)!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise UserError(f"weights file {str(wpath)!r} is not valid JSON: {e}") from None
        if isinstance(raw, dict) and "format" in raw:
            weights_file = wpath
        else:
            weights = _plain_weights(wpath, models)
    report = ensemble_modules(models, output_dir, weights=weights, weights_file=weights_file,
                              lora_exact=bool(params.get("exact", False)), rank=params.get("rank"))
    return {"rows": [], "metrics": {"ensemble": report},
            "extra": {"module_ensemble": report, "weights_file": str(wpath) if wpath else None}}
