"""Tables and plots from results.json files (``mklab report``).

Reading
    :func:`load_records` turns run folders / results.json files into flat *records*: one per
    results row (``model``, ``kind``, ``task``, ``split`` and any other field of the row, e.g.
    ``method``, ``domain`` or ``step``), plus ``run`` (the folder name) and ``command``. A run without
    rows gives one record from its run-level metrics. A sweep (command ``sweep:<cmd>``) gives its
    seed-aggregated rows by default (``metrics`` = means, with ``std`` and ``n``) and each row
    carries the sweep's settings delta as extra fields named by the short key (``learning_rate``);
    with ``children=True`` every child's rows are given instead (the seed becomes a field).

Tables
    :func:`build_table` pivots records: ``rows`` fields down, ``cols`` fields across, one metric
    per cell (``metric``, or each task's first metric). Two records landing in the same cell are
    an error that names the fields telling them apart. The best value per column is marked
    (highest; lowest for metrics named like a loss, error or perplexity, see
    :func:`lower_is_better`; ties all marked, none when the whole column ties). Renderers:
    :func:`to_markdown` (best in bold), :func:`to_csv`, :func:`to_json`, :func:`to_rich`.

Plots (matplotlib, PNG)
    :func:`plot_greedy_curve`, :func:`plot_bars`, :func:`plot_heatmap`; see their docstrings
    for the fields they read.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_lab.errors import UserError
from mergekit_lab.sweeps import numeric_metrics

__all__ = [
    "Table",
    "build_table",
    "find_similarity",
    "load_records",
    "load_results_file",
    "lower_is_better",
    "plot_bars",
    "plot_greedy_curve",
    "plot_heatmap",
    "to_csv",
    "to_json",
    "to_markdown",
    "to_rich",
]

RESULTS_FILE = "results.json"
WEIGHTS_FILE = "weights.json"
_LOWER_WORDS = ("loss", "perplexity", "error", "mse", "mae", "rmse", "wer", "cer")
# fields that are never offered as table fields
_NOT_FIELDS = frozenset({"metrics", "std", "n", "settings", "_sweep"})


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def _schema_version() -> int:
    try:
        from mergekit_lab.results import SCHEMA_VERSION
    except ImportError:  # pragma: no cover - foundation always present in releases
        return 1
    return SCHEMA_VERSION


def load_results_file(path: str | Path) -> dict[str, Any]:
    """Read one results.json (or the one in a folder), checking that it is one we understand.

    Errors name the file: missing, not JSON, not an object, no/unknown ``schema_version``,
    ``metrics`` not an object, ``rows`` not a list of objects.
    """
    path = Path(path)
    file = path / RESULTS_FILE if path.is_dir() else path
    if not file.exists():
        raise UserError(
            f"no results file at {str(file)!r}", hint="give a finished run folder or its results.json"
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"unreadable results file {str(file)!r}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{str(file)!r} is not an mklab results file (not a JSON object)")
    if "schema_version" not in data:
        raise UserError(f"{str(file)!r} is not an mklab results file (no schema_version)")
    known = _schema_version()
    if data["schema_version"] != known:
        raise UserError(
            f"{str(file)!r} has results schema version {data['schema_version']!r}; this mklab reads version {known}",
            hint="use the mklab version that wrote it",
        )
    if not isinstance(data.get("metrics", {}), dict):
        raise UserError(f"{str(file)!r}: 'metrics' must be an object, got {type(data['metrics']).__name__}")
    rows = data.get("rows", [])
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{str(file)!r}: 'rows' must be a list of objects")
    for i, row in enumerate(rows):
        if not isinstance(row.get("metrics", {}), dict):
            raise UserError(f"{str(file)!r}: rows[{i}].metrics must be an object")
    data["_file"] = str(file)
    return data


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _settings_task(settings: Any) -> Any:
    if isinstance(settings, dict):
        data = settings.get("data")
        if isinstance(data, dict) and data.get("task") is not None:
            return data["task"]
        return settings.get("task")
    return None


def _row_record(row: Mapping[str, Any], run: str, command: str, delta: Mapping[str, Any]) -> dict[str, Any]:
    rec: dict[str, Any] = {"run": run, "command": command}
    sweep_fields = []
    for key, value in (delta or {}).items():
        rec[_short(key)] = value
        sweep_fields.append(_short(key))
    for key, value in row.items():
        if key in _NOT_FIELDS:
            continue
        if isinstance(value, (dict, list)):
            continue
        rec[key] = value
    for key, value in (row.get("settings") or {}).items():  # aggregated sweep rows
        rec.setdefault(_short(key), value)
        sweep_fields.append(_short(key))
    rec["_sweep"] = sweep_fields
    rec["metrics"] = numeric_metrics(row.get("metrics"))  # nested dicts flattened: validation.accuracy
    rec["std"] = {k: v for k, v in (row.get("std") or {}).items() if v is None or _is_number(v)}
    rec["n"] = row.get("n")
    return rec


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _run_records(data: Mapping[str, Any], run: str, delta: Mapping[str, Any]) -> list[dict[str, Any]]:
    command = str(data.get("command", ""))
    rows = data.get("rows") or []
    if rows:
        return [_row_record(row, run, command, delta) for row in rows]
    metrics = data.get("metrics") or {}
    if not metrics:
        return []
    row = {"model": run, "kind": command, "task": _settings_task(data.get("settings")), "metrics": metrics}
    return [_row_record(row, run, command, delta)]


def load_records(paths: Iterable[str | Path], *, children: bool = False) -> list[dict[str, Any]]:
    """Records (see the module docstring) from run folders or results.json files, in order."""
    records: list[dict[str, Any]] = []
    for p in paths:
        path = Path(p)
        data = load_results_file(path)
        folder = Path(data["_file"]).parent
        run = folder.name or str(folder)
        command = str(data.get("command", ""))
        if command.startswith("sweep:") and "children" in data:
            if not isinstance(data["children"], list):
                raise UserError(f"{data['_file']!r}: 'children' must be a list")
            if children:
                for child in data["children"]:
                    if not isinstance(child, dict) or "name" not in child:
                        raise UserError(f"{data['_file']!r}: every child needs a name")
                    child_file = folder / str(child.get("path", child["name"])) / RESULTS_FILE
                    child_data = load_results_file(child_file) if child_file.exists() else child
                    child_data = {"command": command[len("sweep:") :], **child_data}
                    records.extend(
                        _run_records(child_data, f"{run}/{child['name']}", child.get("settings") or {})
                    )
                continue
        records.extend(_run_records(data, run, {}))
    return records


def find_similarity(paths: Iterable[str | Path]) -> list[tuple[str, list[str], list[str], list[list[Any]]]]:
    """Similarity weight matrices among the inputs: ``[(file, targets, sources, matrix)]``.

    Looked for in each input's results.json (key ``weights``) and in the ``weights*.json``
    files of its folder (or a weights file given directly). Layouts read (rows are targets,
    columns sources):

    - ``mklab similarity --all-targets``: ``{"matrix": {target: {source: w}}, "columns": [...]}``;
    - ``mklab similarity`` (one target): ``{"target": name, "weights": {source: w}}`` (one row);
    - ``{"weights": [[...]], "targets": [...], "sources": [...]}`` or ``{"weights": {target: {source: w}}}``.
    """
    found = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            candidates = [path / RESULTS_FILE, *sorted(path.glob("weights*.json"))]
        elif path.name == RESULTS_FILE:
            candidates = [path, *sorted(path.parent.glob("weights*.json"))]
        else:
            candidates = [path]
        for file in candidates:
            if not file.is_file():
                continue
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise UserError(f"unreadable similarity file {str(file)!r}: {exc}") from None
            if isinstance(data, dict) and ("weights" in data or "matrix" in data):
                parsed = _parse_weights(data, file)
                if parsed is not None:
                    found.append((str(file), *parsed))
    return found


def _parse_weights(data: Mapping[str, Any], file: Path):
    matrix = data.get("matrix")
    if isinstance(matrix, dict) and matrix and all(isinstance(v, dict) for v in matrix.values()):
        targets = [str(t) for t in matrix]
        sources = [str(c) for c in data.get("columns") or []]
        for row in matrix.values():
            sources.extend(str(c) for c in row if str(c) not in sources)
        return targets, sources, [[matrix[t].get(c) for c in sources] for t in matrix]
    weights = data.get("weights")
    if isinstance(weights, list):
        targets = data.get("targets")
        sources = data.get("sources")
        if not isinstance(targets, list) or not isinstance(sources, list):
            raise UserError(f"{str(file)!r}: a weights matrix needs 'targets' and 'sources' name lists")
        if len(weights) != len(targets) or any(
            not isinstance(r, list) or len(r) != len(sources) for r in weights
        ):
            raise UserError(
                f"{str(file)!r}: the weights matrix is not {len(targets)} targets x {len(sources)} sources"
            )
        return [str(t) for t in targets], [str(s) for s in sources], weights
    if isinstance(weights, dict) and weights:
        if all(isinstance(v, dict) for v in weights.values()):
            targets = [str(t) for t in weights]
            sources: list[str] = []
            for row in weights.values():
                sources.extend(str(s) for s in row if str(s) not in sources)
            matrix = [[weights[t].get(s) for s in sources] for t in weights]
            return targets, sources, matrix
        if all(v is None or _is_number(v) for v in weights.values()):
            target = str(data.get("target", "target"))
            return [target], [str(s) for s in weights], [list(weights.values())]
    return None  # e.g. per-block weights: not a plain matrix


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
def lower_is_better(metric: str) -> bool:
    """Metrics whose name contains loss, perplexity, error, mse, mae, rmse, wer or cer."""
    name = metric.lower()
    return any(word in name for word in _LOWER_WORDS)


@dataclass
class Cell:
    value: float | None = None
    std: float | None = None
    n: int | None = None
    metric: str | None = None
    best: bool = False


@dataclass
class Table:
    row_fields: list[str]
    col_fields: list[str]
    row_keys: list[tuple] = field(default_factory=list)
    col_keys: list[tuple] = field(default_factory=list)
    col_metrics: list[str | None] = field(default_factory=list)
    cells: dict[tuple[tuple, tuple], Cell] = field(default_factory=dict)
    metric: str | None = None  # the --metric, if one was given

    @property
    def has_std(self) -> bool:
        return any(c.std is not None for c in self.cells.values())

    def col_label(self, j: int) -> str:
        label = " ".join("" if v is None else str(v) for v in self.col_keys[j]).strip() or "value"
        if self.metric is None and self.col_metrics[j]:
            label = f"{label} ({self.col_metrics[j]})"
        return label

    def cell(self, i: int, j: int) -> Cell | None:
        return self.cells.get((self.row_keys[i], self.col_keys[j]))


def _fields_of(records: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: list[str] = []
    for rec in records:
        for key in rec:
            if key not in _NOT_FIELDS and key not in seen:
                seen.append(key)
    return seen


def _varying(records: Sequence[Mapping[str, Any]], name: str) -> bool:
    values = {json.dumps(rec.get(name), sort_keys=True, default=str) for rec in records}
    return len(values) > 1


def _distinct(records: Sequence[Mapping[str, Any]], names: Sequence[str]) -> int:
    return len({tuple(json.dumps(r.get(f), sort_keys=True, default=str) for f in names) for r in records})


def default_layout(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """Default ``(rows, cols)``.

    cols: ``task`` (+ ``split`` when several). rows: first the sweep keys (records from sweeps)
    or else ``model`` and ``kind``, as far as they vary; then other varying fields, in the order
    ``method``, the rest as first seen, and ``run`` (the folder name) last, each added only while
    it is still needed to tell the results apart. So a merge table is ``model, kind`` by task
    (a row's ``domain`` or ``step`` follows from its model and task), and a sweep's table is its
    sweep keys (a child's folder name in ``model`` does not repeat them).
    """
    cols = ["task"] + (["split"] if _varying(records, "split") else [])
    sweep: list[str] = []
    for rec in records:
        sweep.extend(f for f in rec.get("_sweep", ()) if f not in sweep)
    order = ["model", "kind", "method"]
    fields = [f for f in order if any(f in r for r in records)]
    fields += [f for f in _fields_of(records) if f not in fields and f != "run"] + ["run"]
    candidates = [f for f in fields if f not in cols and f != "command" and _varying(records, f)]
    target = _distinct(records, candidates + cols)
    base = sweep if sweep else ["model", "kind"]
    rows = [f for f in base if f in candidates]
    for f in candidates:
        if f not in rows and _distinct(records, rows + cols) < target:
            rows.append(f)
    return rows or ["model"], cols


def _first_metrics(records: Sequence[Mapping[str, Any]]) -> dict[Any, str]:
    first: dict[Any, str] = {}
    for rec in records:
        task = rec.get("task")
        if task not in first and rec.get("metrics"):
            first[task] = next(iter(rec["metrics"]))
    return first


def _key(rec: Mapping[str, Any], names: Sequence[str]) -> tuple:
    return tuple(rec.get(n) for n in names)


def build_table(
    records: Sequence[Mapping[str, Any]],
    rows: Sequence[str] | None = None,
    cols: Sequence[str] | None = None,
    metric: str | None = None,
) -> Table:
    """Pivot records into a :class:`Table` (see the module docstring)."""
    if not records:
        raise UserError(
            "no results to report", hint="give run folders that contain results.json with metrics"
        )
    d_rows, d_cols = default_layout(records)
    rows = list(rows) if rows else d_rows
    cols = list(cols) if cols else d_cols
    known = set(_fields_of(records))
    for name in rows + cols:
        if name not in known:
            raise UserError(
                f"unknown report field {name!r}",
                hint=f"choose --rows/--cols from: {', '.join(sorted(known))}",
            )
    if metric is not None and not any(metric in r["metrics"] for r in records):
        names = sorted({m for r in records for m in r["metrics"]})
        raise UserError(f"no result has the metric {metric!r}", hint=f"available: {', '.join(names)}")
    first = _first_metrics(records)
    table = Table(row_fields=rows, col_fields=cols, metric=metric)
    owner: dict[tuple, Mapping[str, Any]] = {}
    col_metric: dict[tuple, set] = {}
    for rec in records:
        m = metric or first.get(rec.get("task"))
        if m is None or m not in rec["metrics"]:
            continue
        rk, ck = _key(rec, rows), _key(rec, cols)
        if (rk, ck) in owner:
            other = owner[(rk, ck)]
            differ = [
                f for f in _fields_of([rec, other]) if f not in rows + cols and rec.get(f) != other.get(f)
            ]
            raise UserError(
                f"two results fall into the same table cell {dict(zip(rows + cols, rk + ck, strict=True))}",
                hint=f"add one of these fields to --rows or --cols: {', '.join(differ) or '(none differ)'}",
            )
        owner[(rk, ck)] = rec
        if rk not in table.row_keys:
            table.row_keys.append(rk)
        if ck not in table.col_keys:
            table.col_keys.append(ck)
        col_metric.setdefault(ck, set()).add(m)
        std = rec.get("std", {}).get(m)
        table.cells[(rk, ck)] = Cell(value=rec["metrics"][m], std=std, n=rec.get("n"), metric=m)
    if not table.cells:
        raise UserError("none of the results has the metric to report", hint="choose one with --metric")
    # columns ordered field by field in first-seen order (task a: its splits, then task b: ...)
    ranks: list[dict[str, int]] = [{} for _ in cols]
    for rec in records:
        for i, name in enumerate(cols):
            ranks[i].setdefault(json.dumps(rec.get(name), default=str), len(ranks[i]))
    table.col_keys.sort(key=lambda ck: tuple(ranks[i][json.dumps(v, default=str)] for i, v in enumerate(ck)))
    for ck in table.col_keys:
        ms = col_metric[ck]
        table.col_metrics.append(next(iter(ms)) if len(ms) == 1 else None)
        cells = [c for (r, c2), c in table.cells.items() if c2 == ck]
        if len(ms) != 1 or not cells:
            continue  # different metrics in one column: no "best"
        (m,) = ms
        best = (min if lower_is_better(m) else max)(c.value for c in cells)
        if len(cells) > 1 and all(c.value == best for c in cells):
            continue  # every result ties: nothing stands out
        for c in cells:
            c.best = c.value == best
    return table


def _fmt(value: Any) -> str:
    """A row field as text: floats in their shortest exact form (``0.001``, ``1e-05``)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _cell_text(cell: Cell | None) -> str:
    if cell is None or cell.value is None:
        return ""
    text = f"{cell.value:.4f}"
    if cell.std is not None:
        text += f" ± {cell.std:.4f}"
    return text


def to_markdown(table: Table) -> str:
    """A GitHub markdown table; the best value per column in bold."""
    header = list(table.row_fields) + [table.col_label(j) for j in range(len(table.col_keys))]
    lines = [
        "| " + " | ".join(h.replace("|", "\\|") for h in header) + " |",
        "|" + "|".join(["---"] * len(table.row_fields) + ["---:"] * len(table.col_keys)) + "|",
    ]
    for i, rk in enumerate(table.row_keys):
        cells = [_fmt(v).replace("|", "\\|") for v in rk]
        for j in range(len(table.col_keys)):
            cell = table.cell(i, j)
            text = _cell_text(cell)
            cells.append(f"**{text}**" if cell is not None and cell.best and text else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """CSV: the row fields, then one column per table column (full precision); when any cell
    has a standard deviation, a ``<column> std`` column follows each column."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = list(table.row_fields)
    with_std = table.has_std
    for j in range(len(table.col_keys)):
        header.append(table.col_label(j))
        if with_std:
            header.append(f"{table.col_label(j)} std")
    writer.writerow(header)
    for i, rk in enumerate(table.row_keys):
        out = ["" if v is None else v for v in rk]
        for j in range(len(table.col_keys)):
            cell = table.cell(i, j)
            out.append("" if cell is None else repr(cell.value))
            if with_std:
                out.append("" if cell is None or cell.std is None else repr(cell.std))
        writer.writerow(out)
    return buf.getvalue()


def to_json(table: Table) -> str:
    """JSON: ``{"metric", "rows", "columns": [{label, fields, metric}], "data": [{fields, cells}]}``."""
    columns = [
        {
            "label": table.col_label(j),
            "fields": dict(zip(table.col_fields, ck, strict=True)),
            "metric": table.col_metrics[j],
        }
        for j, ck in enumerate(table.col_keys)
    ]
    data = []
    for i, rk in enumerate(table.row_keys):
        cells = {}
        for j in range(len(table.col_keys)):
            cell = table.cell(i, j)
            if cell is not None:
                cells[table.col_label(j)] = {
                    "value": cell.value,
                    "std": cell.std,
                    "n": cell.n,
                    "metric": cell.metric,
                    "best": cell.best,
                }
        data.append({"fields": dict(zip(table.row_fields, rk, strict=True)), "cells": cells})
    out = {
        "metric": table.metric,
        "rows": table.row_fields,
        "cols": table.col_fields,
        "columns": columns,
        "data": data,
    }
    return json.dumps(out, indent=2, default=str) + "\n"


def to_rich(table: Table, title: str | None = None):
    """A :class:`rich.table.Table`; the best value per column in bold green."""
    from rich.markup import escape
    from rich.table import Table as RichTable

    rt = RichTable(title=escape(title) if title else None)
    for name in table.row_fields:
        rt.add_column(escape(name))
    for j in range(len(table.col_keys)):
        rt.add_column(escape(table.col_label(j)), justify="right")
    for i, rk in enumerate(table.row_keys):
        cells = [escape(_fmt(v)) for v in rk]  # labels like regmean[a+b] are not markup
        for j in range(len(table.col_keys)):
            cell = table.cell(i, j)
            text = _cell_text(cell)
            cells.append(f"[bold green]{text}[/]" if cell is not None and cell.best and text else text)
        rt.add_row(*cells)
    return rt


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


_PLAIN_FIELDS = frozenset({"model", "method", "kind", "run", "task", "split"})


def _row_label(table: Table, rk: tuple) -> str:
    """Legend text: names as they are (``regmean``), settings as ``key=value`` (``seed=1``)."""
    parts = []
    for name, value in zip(table.row_fields, rk, strict=True):
        if value is None:
            continue
        parts.append(_fmt(value) if name in _PLAIN_FIELDS else f"{name}={_fmt(value)}")
    return ", ".join(parts) or "value"


def plot_bars(table: Table, path: str | Path, title: str | None = None) -> Path:
    """Grouped bar chart of a table: one group per column (e.g. task), one bar per row (e.g.
    method), error bars from the seed standard deviation where the cell has one."""
    plt = _pyplot()
    path = Path(path)
    n_rows, n_cols = len(table.row_keys), len(table.col_keys)
    width = 0.8 / max(n_rows, 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * n_cols * max(1, n_rows) * 0.5 + 2), 4))
    for i, rk in enumerate(table.row_keys):
        xs, ys, errs = [], [], []
        for j in range(n_cols):
            cell = table.cell(i, j)
            if cell is None or cell.value is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            ys.append(cell.value)
            errs.append(cell.std or 0.0)
        ax.bar(xs, ys, width=width, yerr=errs, capsize=3, label=_row_label(table, rk))
    ax.set_xticks(range(n_cols))
    ax.set_xticklabels([table.col_label(j) for j in range(n_cols)], rotation=20, ha="right")
    ax.set_ylabel(table.metric or "score")
    ax.set_title(title or ("scores (error bars: std over seeds)" if table.has_std else "scores"))
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


_IN_DOMAIN = {"in", "in_domain", "in-domain", "id", "indomain"}
_OOD = {"ood", "out", "out_of_domain", "out-of-domain"}


def _domain(rec: Mapping[str, Any]) -> str | None:
    """``in`` / ``ood`` from a row's ``domain`` field, or booleans ``ood`` / ``in_domain``."""
    dom = rec.get("domain")
    if isinstance(dom, str):
        if dom.lower() in _IN_DOMAIN:
            return "in"
        if dom.lower() in _OOD:
            return "ood"
    if isinstance(rec.get("ood"), bool):
        return "ood" if rec["ood"] else "in"
    if isinstance(rec.get("in_domain"), bool):
        return "in" if rec["in_domain"] else "ood"
    return None


def _greedy_step(rec: Mapping[str, Any]) -> int | None:
    for name in ("step", "num_models"):
        k = rec.get(name)
        if isinstance(k, int) and not isinstance(k, bool):
            return k
    return None


def greedy_points(records: Sequence[Mapping[str, Any]], metric: str | None = None) -> dict:
    """``{(domain, line): [(models merged, mean score), ...]}`` from greedy rows.

    ``mklab merge --strategy greedy`` writes one row per (step, method or baseline, task, split)
    with ``step`` = the number of models merged, ``method`` (merged rows), ``kind``
    (``merged``/``ensemble``/``multitask``) and ``domain`` (``in``/``ood``). Rows with an integer
    ``step`` (or ``num_models``) are read; the line is the row's ``method``, else its ``kind``;
    the panel its ``domain`` (or a boolean ``ood``/``in_domain``; none: ``in``). The score at a
    step is the mean over that step's rows (tasks) of ``metric`` or each task's first metric,
    on the first split seen.
    """
    first = _first_metrics(records)
    split0 = next((r.get("split") for r in records if _greedy_step(r) is not None), None)
    acc: dict[tuple, dict[int, list[float]]] = {}
    for rec in records:
        k = _greedy_step(rec)
        if k is None or rec.get("split") != split0:
            continue
        m = metric or first.get(rec.get("task"))
        if m not in rec["metrics"]:
            continue
        dom = _domain(rec) or "in"
        method = str(rec.get("method") or rec.get("kind") or rec.get("model"))
        acc.setdefault((dom, method), {}).setdefault(k, []).append(rec["metrics"][m])
    return {key: sorted((k, sum(v) / len(v)) for k, v in steps.items()) for key, steps in acc.items()}


def plot_greedy_curve(
    records: Sequence[Mapping[str, Any]], path: str | Path, metric: str | None = None
) -> Path | None:
    """Score against number of models merged, one line per method; panels in-domain and OOD
    (see :func:`greedy_points`). Returns None (no file) when no row has a greedy ``step``."""
    points = greedy_points(records, metric)
    if not points:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    domains = [d for d in ("in", "ood") if any(k[0] == d for k in points)]
    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 4), squeeze=False)
    for ax, dom in zip(axes[0], domains, strict=True):
        for (d, method), pts in sorted(points.items()):
            if d != dom:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("number of models merged")
        ax.set_ylabel(metric or "score (each task's metric, averaged)")
        ax.set_title("in-domain" if dom == "in" else "out-of-domain")
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_heatmap(
    targets: Sequence[str],
    sources: Sequence[str],
    matrix: Sequence[Sequence[Any]],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Heatmap: rows targets, columns sources, values annotated; a source equal to its target
    (the diagonal of a leave-one-out matrix) and missing values are left blank."""
    import numpy as np

    plt = _pyplot()
    path = Path(path)
    data = np.full((len(targets), len(sources)), np.nan)
    for i, t in enumerate(targets):
        for j, s in enumerate(sources):
            v = matrix[i][j]
            if t != s and v is not None and _is_number(v):
                data[i, j] = float(v)
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(sources) + 2), max(3, 0.5 * len(targets) + 1.5)))
    im = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(sources)))
    ax.set_xticklabels(sources, rotation=45, ha="right")
    ax.set_yticks(range(len(targets)))
    ax.set_yticklabels(targets)
    ax.set_xlabel("source")
    ax.set_ylabel("target")
    for i in range(len(targets)):
        for j in range(len(sources)):
            if not math.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white")
    fig.colorbar(im, ax=ax)
    ax.set_title(title or "similarity weights")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
