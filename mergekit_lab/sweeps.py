"""Sweeps: expand a grid over settings into named child runs, run them, aggregate over seeds.

A grid maps settings keys (as the user wrote them: a bare field name such as ``learning_rate``
or a dotted key such as ``training.learning_rate``) to lists of values. :func:`run_sweep`

1. expands the grid into the cartesian product (:func:`expand_grid`): keys in the order given,
   values in the order given, the LAST key varying fastest (like nested for-loops, and like
   ``itertools.product``);
2. names every child ``<key>=<value>,<key>=<value>`` (:func:`child_name`; the key is the last
   dotted part, the value made filesystem-safe) and places it in ``<output_dir>/<name>/``;
3. builds and validates the settings of EVERY child before running any, so a bad value in the
   last combination fails before hours of work;
4. runs the children one after another; a child whose ``results.json`` already exists is
   skipped, so an interrupted sweep resumes where it stopped (``--overwrite`` re-runs them all;
   ``--dry-run`` lists the runs and what would be skipped, and runs nothing);
5. writes the parent ``<output_dir>/results.json`` (command ``sweep:<command>``) listing every
   child (name, settings delta, path, metrics, rows) and the aggregates over ``seed``
   (:func:`aggregate`): for every combination of the other keys, mean, sample standard deviation
   (ddof=1; ``null`` when n < 2) and n of every numeric metric, run-level and per row.
   The settings delta recorded for a child holds the validated values (``3e-1`` -> ``0.3``).

Library code: no printing except through the ``console`` handed in by the CLI.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mergekit_lab.errors import UserError

__all__ = [
    "ROW_KEY_FIELDS",
    "aggregate",
    "aggregate_rows",
    "child_name",
    "expand_grid",
    "format_value",
    "numeric_metrics",
    "run_sweep",
    "seed_keys",
    "short_key",
]

#: Fields that identify a results row when rows of several seeds are averaged; any other
#: string / integer / boolean field of the row joins the identity too (see :func:`row_identity`).
ROW_KEY_FIELDS = ("model", "kind", "task", "split")

#: Row fields that never join a row's identity (they differ between seeds by nature).
_VOLATILE_ROW_FIELDS = frozenset({"metrics", "std", "n", "settings", "path", "output_dir", "seconds"})

_MAX_NAME = 200
_UNSAFE = re.compile(r"[^A-Za-z0-9._+\-@]")


# --------------------------------------------------------------------------------------------
# grid expansion and names
# --------------------------------------------------------------------------------------------
def short_key(key: str) -> str:
    """The last dotted part of a settings key: ``training.learning_rate`` -> ``learning_rate``."""
    return key.rsplit(".", 1)[-1]


def _check_grid(grid: Mapping[str, Sequence[Any]]) -> None:
    if not grid:
        raise UserError("the sweep grid is empty", hint="give at least one --sweep key=v1,v2")
    for key, values in grid.items():
        if not isinstance(key, str) or not key.strip() or key != key.strip():
            raise UserError(f"sweep key {key!r} is not a settings key", hint="write --sweep key=v1,v2")
        if short_key(key) == "output_dir":
            raise UserError(
                f"cannot sweep over {key!r}: each child's output folder is chosen by the sweep",
                hint="set the parent folder with --output-dir",
            )
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise UserError(
                f"sweep key {key!r} needs a list of values, got {values!r}",
                hint="in YAML write `sweep: {key: [v1, v2]}`; on the command line --sweep key=v1,v2",
            )
        if len(values) == 0:
            raise UserError(f"sweep key {key!r} has no values", hint="give at least one value")


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the grid as a list of ``{key: value}`` dicts.

    Keys keep the given order and values their given order; the last key varies fastest:
    ``{"a": [1, 2], "b": [3, 4]}`` -> ``a=1,b=3``, ``a=1,b=4``, ``a=2,b=3``, ``a=2,b=4``.
    """
    _check_grid(grid)
    keys = list(grid)
    return [
        dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(list(grid[k]) for k in keys))
    ]


def format_value(value: Any) -> str:
    """A value as it appears in a child's folder name: short, readable and filesystem-safe.

    Booleans ``true``/``false``, ``null``, integers as written, floats by ``repr`` (``0.3``,
    ``1e-05``), lists joined by ``+``; any character outside ``[A-Za-z0-9._+-@]`` becomes ``_``
    (so ``glue/sst2`` -> ``glue_sst2``).
    """
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        text = repr(value)
    elif isinstance(value, (list, tuple)):
        text = "+".join(format_value(v) for v in value)
    elif isinstance(value, Mapping):
        text = "+".join(f"{k}-{format_value(v)}" for k, v in value.items())
    else:
        text = str(value)
    text = _UNSAFE.sub("_", text)
    return text or "_"


def _name_keys(keys: Iterable[str]) -> dict[str, str]:
    """Key as written -> key used in names: the short key unless two keys share it."""
    keys = list(keys)
    shorts = [short_key(k) for k in keys]
    return {
        k: (s if shorts.count(s) == 1 else _UNSAFE.sub("_", k)) for k, s in zip(keys, shorts, strict=True)
    }


def child_name(overrides: Mapping[str, Any], name_keys: Mapping[str, str] | None = None) -> str:
    """``<short key>=<value>,...`` in the order of ``overrides``.

    ``name_keys`` maps a key as written to the name used (default: its short key). A name longer
    than 200 characters is cut and suffixed with a hash of the full name, so it stays unique.
    """
    name_keys = name_keys or _name_keys(overrides)
    name = ",".join(f"{name_keys.get(k, short_key(k))}={format_value(v)}" for k, v in overrides.items())
    if name in {".", ".."}:
        name = f"_{name}"
    if len(name) > _MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:12]
        name = f"{name[: _MAX_NAME - 13]}-{digest}"
    return name


def plan_children(grid: Mapping[str, Sequence[Any]]) -> list[tuple[str, dict[str, Any]]]:
    """``[(name, overrides), ...]`` for the grid, with unique names (duplicates are an error)."""
    combos = expand_grid(grid)
    name_keys = _name_keys(grid)
    seen: dict[str, dict[str, Any]] = {}
    planned = []
    for combo in combos:
        name = child_name(combo, name_keys)
        if name in seen:
            raise UserError(
                f"sweep children {seen[name]} and {combo} get the same folder name {name!r}",
                hint="remove duplicate values from the sweep lists",
            )
        seen[name] = combo
        planned.append((name, combo))
    return planned


# --------------------------------------------------------------------------------------------
# aggregation over seeds
# --------------------------------------------------------------------------------------------
def seed_keys(keys: Iterable[str]) -> list[str]:
    """The grid keys averaged over: those whose short name is ``seed`` (``seed``, ``run.seed``)."""
    return [k for k in keys if short_key(k) == "seed"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def numeric_metrics(metrics: Mapping[str, Any] | None, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a metrics dict; nested dicts are flattened with ``.``."""
    out: dict[str, float] = {}
    for name, value in (metrics or {}).items():
        full = f"{prefix}{name}"
        if isinstance(value, Mapping):
            out.update(numeric_metrics(value, prefix=f"{full}."))
        elif _is_number(value):
            out[full] = float(value)
    return out


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "n"}``: std is the sample standard deviation (ddof=1), None when n < 2."""
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def _summarise(metric_lists: Mapping[str, list[float]]) -> dict[str, dict[str, Any]]:
    return {name: mean_std(values) for name, values in metric_lists.items() if values}


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return tuple((k, _freeze(v)) for k, v in value.items())
    return value


def row_identity(row: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """What makes two rows of different seeds "the same row": ``model``, ``kind``, ``task``,
    ``split`` and every other field holding a string, integer, boolean or null (e.g. ``method``,
    ``num_models``, ``domain``), except ``metrics``/``std``/``n``/``settings``/``path``/
    ``output_dir``/``seconds``. Float fields (timings, sizes) are not part of the identity."""
    ident = [(f, row.get(f)) for f in ROW_KEY_FIELDS]
    for field, value in row.items():
        if field in ROW_KEY_FIELDS or field in _VOLATILE_ROW_FIELDS:
            continue
        if value is None or isinstance(value, (str, int, bool)) and not isinstance(value, float):
            ident.append((field, value))
    return tuple(ident)


def _wildcard(values: Sequence[str]) -> str:
    """Strings that differ between seeds as one pattern: common prefix + ``*`` + common suffix
    (``zoo/sst2-s1-ab12``, ``zoo/sst2-s2-cd34`` -> ``zoo/sst2-s*``)."""
    first = values[0]
    prefix = 0
    while prefix < len(first) and all(len(v) > prefix and v[prefix] == first[prefix] for v in values):
        prefix += 1
    suffix = 0
    shortest = min(len(v) for v in values)
    while suffix < shortest - prefix and all(
        v[len(v) - 1 - suffix] == first[len(first) - 1 - suffix] for v in values
    ):
        suffix += 1
    return first[:prefix] + "*" + (first[len(first) - suffix :] if suffix else "")


def _pool(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    lists: dict[str, list[float]] = {}
    for row in entries:
        for name, value in numeric_metrics(row.get("metrics")).items():
            lists.setdefault(name, []).append(value)
    return _summarise(lists)


def aggregate_rows(rows_per_run: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Average rows across runs.

    Rows with the same :func:`row_identity` are pooled. When that leaves some row without a
    partner in every run (a text field such as a zoo model path differs between seeds) but all
    runs wrote the same number of rows whose identities differ only in text fields, rows are
    pooled by position instead and each differing text field becomes a pattern
    (``zoo/sst2-seed*``). Returns one dict per pooled row, in first-seen order: the identity
    fields plus ``metrics: {name: {"mean", "std", "n"}}`` over the numeric ``metrics``.
    """
    runs = [list(rows) for rows in rows_per_run if rows]
    pooled: dict[tuple, tuple[dict[str, Any], list[Mapping[str, Any]]]] = {}
    for rows in runs:
        for row in rows:
            ident = row_identity(row)
            pooled.setdefault(_freeze(ident), (dict(ident), []))[1].append(row)
    complete = all(len(entries) == len(runs) for _, entries in pooled.values())
    if not complete and len(runs) > 1 and len({len(rows) for rows in runs}) == 1:
        by_position = []
        for position in zip(*runs, strict=True):
            idents = [dict(row_identity(row)) for row in position]
            fields = idents[0]
            if any(set(i) != set(fields) for i in idents):
                break
            out: dict[str, Any] = {}
            for name in fields:
                values = [i[name] for i in idents]
                if all(v == values[0] for v in values):
                    out[name] = values[0]
                elif all(isinstance(v, str) for v in values):
                    out[name] = _wildcard(values)
                else:
                    break
            else:
                by_position.append({**out, "metrics": _pool(position)})
                continue
            break
        else:
            return by_position
    return [{**fields, "metrics": _pool(entries)} for fields, entries in pooled.values()]


def aggregate(
    children: Sequence[Mapping[str, Any]], over: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Aggregate finished children over the seed keys.

    ``children``: dicts with ``name``, ``settings`` (the delta: key as written -> value),
    ``metrics`` and ``rows``. ``over``: the keys averaged over (default: :func:`seed_keys` of the
    settings keys). Children with the same values for every other key form one group, in the
    order of their first child. Each group: ``settings`` (the other keys), ``n`` (children),
    ``children`` (names), ``metrics`` ``{name: {"mean", "std", "n"}}`` and ``rows`` (per row
    identity, see :func:`aggregate_rows`). Only finite numbers are averaged; a metric missing or
    non-finite in some children is averaged over the others (its own ``n`` says how many).
    """
    if over is None:
        keys: list[str] = []
        for child in children:
            keys.extend(k for k in child.get("settings", {}) if k not in keys)
        over = seed_keys(keys)
    over = set(over)
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    group_settings: dict[tuple, dict[str, Any]] = {}
    for child in children:
        rest = {k: v for k, v in child.get("settings", {}).items() if k not in over}
        key = _freeze(rest)
        groups.setdefault(key, []).append(child)
        group_settings.setdefault(key, rest)
    out = []
    for key, members in groups.items():
        lists: dict[str, list[float]] = {}
        for child in members:
            for name, value in numeric_metrics(child.get("metrics")).items():
                lists.setdefault(name, []).append(value)
        out.append(
            {
                "settings": group_settings[key],
                "n": len(members),
                "children": [c.get("name") for c in members],
                "metrics": _summarise(lists),
                "rows": aggregate_rows([c.get("rows") or [] for c in members]),
            }
        )
    return out


def aggregated_table_rows(groups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The aggregates as rows in the usual row convention (for ``results.json`` ``rows``).

    One row per (group, row identity): the identity fields, ``settings`` (the group's settings
    delta), ``metrics`` ``{name: mean}``, ``std`` ``{name: std or None}`` and ``n`` (children in
    the group). Groups whose children wrote no rows contribute one row with their run metrics.
    """
    rows = []
    for group in groups:
        source_rows = group.get("rows") or []
        if not source_rows and group.get("metrics"):
            source_rows = [{f: None for f in ROW_KEY_FIELDS} | {"metrics": group["metrics"]}]
        for row in source_rows:
            stats = row.get("metrics", {})
            fields = {k: v for k, v in row.items() if k != "metrics"}
            rows.append(
                {
                    **fields,
                    "settings": dict(group.get("settings", {})),
                    "metrics": {m: s["mean"] for m, s in stats.items()},
                    "std": {m: s["std"] for m, s in stats.items()},
                    "n": group.get("n", 0),
                }
            )
    return rows


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------
def _read_child(path: Path) -> dict[str, Any] | None:
    """The child's results.json if it exists and reads; None when it does not exist."""
    file = path / "results.json"
    if not file.is_file():
        return None
    try:
        from mergekit_lab.results import load_results
    except ImportError:  # foundation not there yet: plain JSON
        load_results = None  # type: ignore[assignment]
    try:
        if load_results is not None:
            return load_results(file)
        return json.loads(file.read_text())
    except UserError:
        raise
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot read the finished sweep child {file}: {exc}",
            hint="delete that child's folder to run it again",
        ) from exc


def _write_json(path: Path, obj: Any) -> None:
    try:
        from mergekit_lab.results import write_json_atomic
    except ImportError:
        write_json_atomic = None  # type: ignore[assignment]
    if write_json_atomic is not None:
        write_json_atomic(path, obj)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def _say(console: Any, message: str, *, force: bool = False) -> None:
    """A progress line: through ``runtime.log`` (rank 0, respects --quiet unless ``force``) when
    ``console`` is the runtime console or None; other consoles (tests) get every line."""
    from rich.markup import escape

    from mergekit_lab import runtime

    if console is not None and console is not runtime.console:
        console.print(escape(message), highlight=False)
    else:
        runtime.log(escape(message), force=force)


def _is_main_process() -> bool:
    from mergekit_lab.runtime import is_main_process

    return is_main_process()


def _settings_dump(settings: Any) -> Any:
    dump = getattr(settings, "model_dump", None)
    return dump(mode="json") if dump is not None else settings


_MISSING = object()


def resolved_value(settings_dump: Any, key: str, default: Any = None) -> Any:
    """The validated value of ``key`` in a settings dump (dotted path, or a bare field name looked
    up at the top level and then in each group); ``default`` when not found. So ``3e-1``, which
    YAML reads as a string, is recorded as the float 0.3 that the run used."""
    if not isinstance(settings_dump, Mapping):
        return default
    if "." in key:
        node: Any = settings_dump
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node
    if key in settings_dump:
        return settings_dump[key]
    for group in settings_dump.values():
        if isinstance(group, Mapping) and key in group:
            return group[key]
    return default


def _pooled_name(name_keys: Mapping[str, str], combo: Mapping[str, Any], over: Sequence[str]) -> str:
    """A child's name with the seed values replaced by ``*``: ``lr=0.1,seed=*``."""
    parts = [f"{name_keys[k]}={'*' if k in over else format_value(v)}" for k, v in combo.items()]
    return ",".join(parts)


def _normalise_paths(value: Any, mapping: Mapping[str, str]) -> Any:
    """Replace a child's own folder in string fields (e.g. ``model`` = the run's output folder)
    by the pooled name, so rows of different seeds are recognised as the same row."""
    if isinstance(value, str):
        for old, new in mapping.items():
            if value == old or value.startswith(old + "/"):
                return new + value[len(old) :]
        return value
    if isinstance(value, list):
        return [_normalise_paths(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: (v if k == "metrics" else _normalise_paths(v, mapping)) for k, v in value.items()}
    return value


def run_sweep(
    command: str,
    grid: Mapping[str, Sequence[Any]],
    build_settings: Callable[[dict[str, Any]], Any],
    run_fn: Callable[[Any], Any],
    output_dir: Path,
    dry_run: bool,
    console: Any = None,
) -> dict[str, Any]:
    """Run every child of ``grid`` (see the module docstring) and write the parent results.json.

    ``build_settings(overrides)`` returns a child's validated settings (overrides: the child's
    grid values, keys as written, plus ``"run.output_dir"``); ``run_fn(settings)`` runs it and
    leaves ``<child>/results.json``. Returns the parent results dict (for ``dry_run``: the plan,
    nothing written).
    """
    if output_dir is None:
        raise UserError(f"a sweep of {command} needs an output folder", hint="pass --output-dir DIR")
    output_dir = Path(output_dir)
    planned = plan_children(grid)

    # 1. validate every child before running any
    children = []
    for name, combo in planned:
        path = output_dir / name
        try:
            settings = build_settings({**combo, "run.output_dir": path})
        except UserError as exc:
            raise UserError(f"sweep child {name}: {exc.message}", hint=exc.hint) from exc
        children.append({"name": name, "overrides": combo, "path": path, "settings": settings})

    for child in children:
        # --overwrite (run.overwrite in the child's settings) re-runs finished children
        overwrite = bool(getattr(getattr(child["settings"], "run", None), "overwrite", False))
        child["done"] = (child["path"] / "results.json").is_file() and not overwrite

    if dry_run:
        n_done = sum(c["done"] for c in children)
        _say(
            console,
            f"sweep {command}: {len(children)} runs under {output_dir} ({n_done} already finished)",
            force=True,
        )
        for i, child in enumerate(children, 1):
            state = "done, skipped" if child["done"] else "to run"
            _say(console, f"  {i:>3}. {child['name']}  [{state}]", force=True)
        return {
            "command": f"sweep:{command}",
            "dry_run": True,
            "grid": {k: list(v) for k, v in grid.items()},
            "children": [
                {"name": c["name"], "settings": c["overrides"], "path": c["name"], "done": c["done"]}
                for c in children
            ],
        }

    # 2. run, skipping finished children; never replace a results.json that is not this sweep's
    _check_parent_folder(command, output_dir, build_settings)
    start = time.time()
    start_iso = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(start))
    output_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i, child in enumerate(children, 1):
        label = f"[{i}/{len(children)}] {child['name']}"
        if child["done"]:
            _say(console, f"sweep {label}: finished before, skipped")
            status = "skipped"
        else:
            _say(console, f"sweep {label}: running")
            try:
                run_fn(child["settings"])
            except BaseException:
                _say(console, f"sweep {label}: failed; run the same command again to resume from here")
                raise
            status = "ran"
        result = _read_child(child["path"])
        if result is None:
            raise UserError(
                f"sweep child {child['name']} finished without writing {child['path'] / 'results.json'}",
                hint=f"check that `{command}` writes results.json into its --output-dir",
            )
        dump = _settings_dump(child["settings"])
        delta = {k: resolved_value(dump, k, v) for k, v in child["overrides"].items()}
        records.append(
            {
                "name": child["name"],
                "settings": delta,
                "path": child["name"],
                "status": status,
                "metrics": result.get("metrics", {}),
                "rows": result.get("rows", []),
            }
        )

    # 3. parent results.json; rows that name the child's own folder are pooled under
    # "<output_dir>/<name with seed=*>" so that seeds average together
    over = seed_keys(grid)
    name_keys = _name_keys(grid)
    pooled_input = []
    for child, record in zip(children, records, strict=True):
        target = str(output_dir / _pooled_name(name_keys, child["overrides"], over))
        mapping = {str(child["path"]): target, str(Path(child["path"]).resolve()): target}
        pooled_input.append({**record, "rows": _normalise_paths(record["rows"], mapping)})
    groups = aggregate(pooled_input, over=over)
    end = time.time()
    parent: dict[str, Any] = _parent_header(command, build_settings, output_dir)
    parent.update(
        {
            "start_time": start_iso,
            "end_time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(end)),
            "wall_seconds": end - start,
            "metrics": {},
            "rows": aggregated_table_rows(groups),
            "artifacts": {c["name"]: f"{c['path']}/results.json" for c in records},
            "sweep": {
                "grid": {k: list(v) for k, v in grid.items()},
                "order": "cartesian product, keys in the given order, last key varies fastest",
                "aggregated_over": over,
                "std": "sample standard deviation (ddof=1); null when n < 2",
            },
            "children": records,
            "aggregates": groups,
        }
    )
    if _is_main_process():  # under accelerate/torchrun every rank runs the sweep; one writes
        _write_json(output_dir / "results.json", parent)
    _say(console, f"sweep {command}: {len(records)} runs, results in {output_dir / 'results.json'}")
    _show_summary(parent, output_dir, console)
    return parent


def _show_summary(parent: Mapping[str, Any], output_dir: Path, console: Any) -> None:
    """The seed-aggregated table (what ``mklab report`` shows), on rank 0 unless --quiet."""
    from mergekit_lab import runtime
    from mergekit_lab.report import _run_records, build_table, to_rich

    if not runtime.is_main_process() or getattr(runtime, "_QUIET", False):
        return
    try:
        table = build_table(_run_records(parent, output_dir.name, {}))
    except UserError:
        return  # nothing tabular (no metrics) or ambiguous: `mklab report` offers --rows/--cols
    over = parent.get("sweep", {}).get("aggregated_over")
    title = f"{parent['command']} (mean ± std over {', '.join(over)})" if over else str(parent["command"])
    (console or runtime.console).print(to_rich(table, title=title))


def _check_parent_folder(
    command: str, output_dir: Path, build_settings: Callable[[dict[str, Any]], Any]
) -> None:
    file = output_dir / "results.json"
    if not file.is_file():
        return
    try:
        previous = json.loads(file.read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        previous = None
    if previous == f"sweep:{command}":
        return
    try:
        overwrite = bool(build_settings({"run.output_dir": output_dir}).run.overwrite)
    except (UserError, AttributeError):
        overwrite = False
    if not overwrite:
        raise UserError(
            f"{file} belongs to another run ({previous or 'unknown command'}), not to a sweep of {command}",
            hint="choose another --output-dir for the sweep, or pass --overwrite",
        )


def _parent_header(command: str, build_settings: Callable[[dict[str, Any]], Any], output_dir: Path) -> dict:
    """schema_version, command, settings (the parent's, without sweep overrides), versions, commit."""
    try:
        settings = _settings_dump(build_settings({"run.output_dir": output_dir}))
    except UserError:
        settings = {}
    header: dict[str, Any] = {"schema_version": 1, "command": f"sweep:{command}", "settings": settings}
    try:
        from mergekit_lab import results as _results
    except ImportError:
        return header
    header["schema_version"] = getattr(_results, "SCHEMA_VERSION", 1)
    for name, key in (("package_versions", "versions"), ("git_commit", "git_commit")):
        fn = getattr(_results, name, None)
        if callable(fn):
            try:
                header[key] = fn()
            except Exception:  # noqa: BLE001 - provenance is best effort
                pass
    try:
        from mergekit_lab.runtime import peak_memory_mb

        header["peak_memory_mb"] = peak_memory_mb()
    except Exception:  # noqa: BLE001
        pass
    return header
