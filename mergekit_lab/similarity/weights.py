"""Turning scores into ensembling weights, and the weights file that ``mklab merge`` reads.

``w = softmax(sign * s / tau)`` over the sources (the target's own module excluded). The file::

    {"format": "mklab-similarity-weights", "version": 1, "target": "glue/rte", "measure": "grand",
     "sign": -1, "temperature": 0.1, "granularity": "block",
     "sources": [{"name": "sst2", "path": "/abs/pool/sst2", "task": "glue/sst2"}, ...],
     "excluded": [{"name": "rte", "path": "...", "reason": "target"}],
     "weights": {"sst2": 0.4, ...},                         # model level (always present)
     "groups": {"bert.encoder.layer.0": {"sst2": 0.3, ...}}} # block / layer granularity

A tensor uses the weights of its group (:func:`mergekit_lab.similarity.measures.group_of`) and
the model-level weights when it belongs to no group.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mergekit_lab.errors import UserError
from mergekit_lab.similarity.measures import group_of

FORMAT = "mklab-similarity-weights"
GRANULARITIES = ("model", "block", "layer")


def softmax_weights(scores: dict[str, float], sign: int, temperature: float) -> dict[str, float]:
    """softmax(sign * s / tau) over the sources; tau -> 0 is the argmax, tau -> inf uniform."""
    if not (temperature > 0) or not math.isfinite(temperature):
        raise UserError(f"temperature must be > 0, got {temperature}", hint="pass e.g. --temperature 0.1")
    if not scores:
        raise UserError("no sources to weight", hint="the pool needs at least one module besides the target")
    bad = [k for k, v in scores.items() if not math.isfinite(v)]
    if bad:
        raise UserError(f"the score of source {bad[0]!r} is not finite ({scores[bad[0]]})",
                        hint="check the module and the target data")
    x = {k: sign * v / temperature for k, v in scores.items()}
    m = max(x.values())
    e = {k: math.exp(v - m) for k, v in x.items()}
    z = sum(e.values())
    return {k: v / z for k, v in e.items()}


def uniform_weights(names: list[str]) -> dict[str, float]:
    return {n: 1.0 / len(names) for n in names}


def category_weights(scores: dict[str, float]) -> dict[str, float]:
    """Equal weights over the sources in the target's category (score 1), none elsewhere."""
    inside = [k for k, v in scores.items() if v > 0]
    if not inside:
        raise UserError("no source shares the target's category",
                        hint="check --categories (name=task1,task2) covers the target and some sources")
    return {k: (1.0 / len(inside) if k in inside else 0.0) for k in scores}


def parse_categories(items: list[str]) -> dict[str, str]:
    """``["sentiment=glue/sst2,emotion/isear", ...]`` -> task -> category."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--categories {item!r} must look like name=task1,task2")
        name, tasks = item.split("=", 1)
        for t in tasks.split(","):
            if t.strip():
                out[t.strip()] = name.strip()
    return out


def make_weights_file(*, target: str, measure: str, sign: int, temperature: float | None, granularity: str,
                      sources: list[dict[str, Any]], weights: dict[str, float],
                      groups: dict[str, dict[str, float]] | None = None,
                      excluded: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"format": FORMAT, "version": 1, "target": target, "measure": measure, "sign": sign,
            "temperature": temperature, "granularity": granularity, "sources": sources,
            "excluded": excluded or [], "weights": weights, "groups": groups or {}}


def read_weights_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"weights file {str(p)!r} does not exist", hint="write one with mklab similarity") from None
    except json.JSONDecodeError as e:
        raise UserError(f"weights file {str(p)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{str(p)!r} is not an mklab similarity weights file",
                        hint="use the weights.json that mklab similarity wrote (one target)")
    if data.get("granularity") not in GRANULARITIES:
        raise UserError(f"weights file {str(p)!r} has unknown granularity {data.get('granularity')!r}")
    return data


def match_pool(data: dict[str, Any], model_dirs: list[str | Path], where: str = "weights file") -> list[str | None]:
    """For each model folder, the source name it has in the weights file (None: excluded, weight 0).

    Folders are matched by resolved path, then by folder name. A folder the file does not know,
    or a source of the file that is not among the folders, is an error.
    """
    by_path = {str(Path(s["path"]).resolve()): s["name"] for s in data["sources"] if s.get("path")}
    names = {s["name"] for s in data["sources"]}
    excl_paths = {str(Path(e["path"]).resolve()) for e in data.get("excluded", []) if e.get("path")}
    excl_names = {e["name"] for e in data.get("excluded", [])}
    out: list[str | None] = []
    for d in model_dirs:
        rp = str(Path(d).resolve())
        if rp in by_path:
            out.append(by_path[rp])
        elif rp in excl_paths:
            out.append(None)
        elif Path(d).name in names:
            out.append(Path(d).name)
        elif Path(d).name in excl_names:
            out.append(None)
        else:
            raise UserError(f"module {str(d)!r} is not in the {where} (sources: {', '.join(sorted(names))})",
                            hint="merge the pool the weights were computed for")
    missing = sorted(names - {n for n in out if n})
    if missing:
        raise UserError(f"the {where} weights source(s) {', '.join(missing)} that are not among the merged modules",
                        hint="pass every pool module the weights were computed for")
    if len([n for n in out if n]) != len({n for n in out if n}):
        raise UserError(f"two merged modules match the same source of the {where}")
    return out


def tensor_weights(data: dict[str, Any], key: str) -> dict[str, float]:
    """The per-source weights for one tensor under the file's granularity."""
    g = group_of(key, data["granularity"])
    if g is not None and g in data.get("groups", {}):
        return data["groups"][g]
    return data["weights"]
