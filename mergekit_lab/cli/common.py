"""Turning a settings class into a Typer command.

``register_command(app, name, SettingsClass, run_fn)`` generates one ``--kebab-case`` flag per
settings field (help text from the field description), plus the shared ``--preset``,
``--config``, ``--set``, ``--template``, ``--sweep``, ``--dry-run`` and ``--print-config``. The
command resolves every source into one validated settings object and calls ``run_fn(settings)``.
Bad input (:class:`UserError`) is one line on stderr and exit code 2; a traceback only with
``--debug``. List-valued settings take several values after one flag (``--models a b c``).
"""

from __future__ import annotations

import inspect
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

import click
import typer
from typer.core import TyperCommand

from mergekit_lab import settings as S
from mergekit_lab.errors import UserError
from mergekit_lab.runtime import console, set_quiet

COMMON = ("preset", "config", "set_", "template", "sweep", "dry_run", "print_config")
_NUMBER = re.compile(r"^-\d+(\.\d*)?([eE][-+]?\d+)?$")


def _option_type(info: Any) -> tuple[Any, str]:
    """The Typer annotation for a settings field and an extra help suffix (choices)."""
    ann = info.annotation
    args = [a for a in get_args(ann) if a is not type(None)]
    base = ann if not args or get_origin(ann) is Literal else (args[0] if len(args) == 1 else ann)
    if get_origin(ann) in (list, tuple) or get_origin(base) in (list, tuple):
        inner = get_args(base)[0] if get_args(base) else str
        inner = inner if inner in (int, float, str) else str
        return Optional[list[inner]], ""  # noqa: UP045 - typer needs Optional
    if get_origin(base) is Literal:
        return Optional[str], f" [{'|'.join(map(str, get_args(base)))}]"  # noqa: UP045
    if base is bool:
        return Optional[bool], ""  # noqa: UP045
    if base in (int, float, str):
        return Optional[base], ""  # noqa: UP045
    if base is Path:
        return Optional[str], ""  # noqa: UP045
    return Optional[str], " (YAML value)"  # noqa: UP045


def _list_flags(settings_cls) -> set[str]:
    out = {"--config", "--set", "--template", "--sweep"}
    for name, (_, _, info) in S.field_map(settings_cls).items():
        if S.is_list_field(info):
            out.add(S.flag_name(name, info))
    return out


def expand_multi_values(args: list[str], list_flags: set[str]) -> list[str]:
    """``--models a b --x 1`` -> ``--models a --models b --x 1`` for list-valued flags."""
    out: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        if tok == "--":
            out.extend(args[i:])
            break
        flag = tok.split("=", 1)[0]
        if flag in list_flags:
            if "=" in tok:
                out.append(tok)
                i += 1
                continue
            j = i + 1
            vals = []
            while j < len(args) and (not args[j].startswith("-") or _NUMBER.match(args[j])):
                vals.append(args[j])
                j += 1
            if not vals:
                out.append(tok)  # let click report the missing value
            for v in vals:
                out.extend([flag, v])
            i = j
            continue
        out.append(tok)
        i += 1
    return out


def make_command_class(settings_cls) -> type[TyperCommand]:
    flags = _list_flags(settings_cls)

    class SettingsCommand(TyperCommand):
        def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
            return super().parse_args(ctx, expand_multi_values(list(args), flags))

    return SettingsCommand


def report_error(err: BaseException, debug: bool) -> int:
    if isinstance(err, UserError):
        if debug:
            traceback.print_exception(err)
        console.print(f"[bold red]error:[/bold red] {err.one_line()}", highlight=False, soft_wrap=True)
        return err.exit_code
    if debug:
        traceback.print_exception(err)
    else:
        msg = str(err).splitlines()[0] if str(err) else ""
        console.print(f"[bold red]error:[/bold red] {type(err).__name__}: {msg} (run with --debug for the traceback)",
                      highlight=False, soft_wrap=True)
    return 1


def _flag_values(settings_cls, kwargs: dict[str, Any]) -> dict[str, Any]:
    flags = {}
    fm = S.field_map(settings_cls)
    for name, value in kwargs.items():
        if name in COMMON or value is None:
            continue
        _, _, info = fm[name]
        if isinstance(value, list) and not value:
            continue
        ann_type, suffix = _option_type(info)
        if suffix == " (YAML value)" and isinstance(value, str):
            import yaml

            value = yaml.safe_load(value)
        flags[name] = value
    return flags


def parse_sweep_flags(values: list[str]) -> dict[str, list[Any]]:
    import yaml

    grid: dict[str, list[Any]] = {}
    for v in values:
        if "=" not in v:
            raise UserError(f"--sweep {v!r} must look like key=v1,v2,...")
        key, raw = v.split("=", 1)
        vals = [yaml.safe_load(x) if x.strip() else "" for x in raw.split(",")]
        grid[key.strip()] = vals
    return grid


def build_from_loaded(settings_cls, loaded: S.Loaded, templates: list[str], overrides: dict[str, Any] | None = None):
    raw = loaded.raw
    if overrides:
        d: dict[str, Any] = {}
        for key, value in overrides.items():
            S.set_dotted(d, S.resolve_key(settings_cls, key), value)
        raw = S.deep_merge(raw, d)
    values = dict(S.parse_assignment(t, "--template") for t in templates)
    return S.validate(settings_cls, S.apply_templates(raw, values), loaded.sources)


def register_command(app: typer.Typer, name: str, settings_cls, run_fn: Callable[[Any], Any], help: str) -> None:
    """Mount ``name`` on ``app``: flags generated from ``settings_cls``, work done by ``run_fn``."""
    fm = S.field_map(settings_cls)
    params: list[inspect.Parameter] = []
    annotations: dict[str, Any] = {}
    panels = {"run": "Run", "model": "Model", "data": "Data", "training": "Training"}
    for field, (group, _, info) in fm.items():
        ann, suffix = _option_type(info)
        flag = S.flag_name(field, info)
        decls = [flag]
        if ann == Optional[bool]:  # noqa: UP045
            decls = [f"{flag}/--no-{flag[2:]}"]
        default_note = ""
        from pydantic_core import PydanticUndefined

        if (info.default is not None and info.default is not PydanticUndefined and info.default is not ...
                and not S.is_list_field(info) and not isinstance(info.default, dict)):
            default_note = f" (default: {info.default})"
        opt = typer.Option(None, *decls, help=(info.description or "") + suffix + default_note,
                           show_default=False, rich_help_panel=panels.get(group, group.replace("_", " ").title()))
        params.append(inspect.Parameter(field, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann))
        annotations[field] = ann
    common = [
        ("preset", Optional[str], typer.Option(None, "--preset", help="Start from a named preset (see `mklab presets`).",  # noqa: UP045
                                               rich_help_panel="Config")),
        ("config", Optional[list[str]], typer.Option(None, "--config", help="YAML config file(s), deep-merged left to right.",  # noqa: UP045
                                                     rich_help_panel="Config")),
        ("set_", Optional[list[str]], typer.Option(None, "--set", help="Override any setting: dotted.key=value.",  # noqa: UP045
                                                   rich_help_panel="Config")),
        ("template", Optional[list[str]], typer.Option(None, "--template", help="Fill {name} placeholders: name=value.",  # noqa: UP045
                                                       rich_help_panel="Config")),
        ("sweep", Optional[list[str]], typer.Option(None, "--sweep", help="Grid over a setting: key=v1,v2 (repeatable).",  # noqa: UP045
                                                    rich_help_panel="Config")),
        ("dry_run", bool, typer.Option(False, "--dry-run", help="With a sweep: list the runs and exit.",
                                       rich_help_panel="Config")),
        ("print_config", bool, typer.Option(False, "--print-config", help="Print the resolved settings as YAML and exit.",
                                            rich_help_panel="Config")),
    ]
    for pname, ann, opt in common:
        params.append(inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann))
        annotations[pname] = ann

    def command(**kwargs: Any) -> None:
        debug = bool(kwargs.get("debug")) or "--debug" in sys.argv
        try:
            code = _run(settings_cls, name, run_fn, kwargs)
        except (KeyboardInterrupt, typer.Exit):
            raise
        except Exception as err:  # noqa: BLE001 - the CLI boundary
            raise typer.Exit(report_error(err, debug)) from None
        if code:
            raise typer.Exit(code)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = annotations
    command.__name__ = name.replace("-", "_")
    command.__doc__ = help
    app.command(name, cls=make_command_class(settings_cls), help=help,
                context_settings={"help_option_names": ["-h", "--help"]})(command)


def _run(settings_cls, name: str, run_fn: Callable[[Any], Any], kwargs: dict[str, Any]) -> int:
    flags = _flag_values(settings_cls, kwargs)
    loaded = S.merge_sources(settings_cls, command=name, preset=kwargs.get("preset"),
                             configs=kwargs.get("config") or (), sets=kwargs.get("set_") or (), flags=flags)
    templates = list(kwargs.get("template") or [])
    settings = build_from_loaded(settings_cls, loaded, templates)
    grid: dict[str, list[Any]] = {}
    resolved: dict[str, str] = {}  # dotted key -> spelling kept in the grid (flags win over YAML)
    for key, vals in [*loaded.sweep.items(), *parse_sweep_flags(list(kwargs.get("sweep") or [])).items()]:
        dotted = S.resolve_key(settings_cls, key)
        if dotted in resolved:
            del grid[resolved[dotted]]
        resolved[dotted] = key
        grid[key] = vals
    if kwargs.get("print_config"):
        out = S.to_yaml(settings)
        if grid:
            import yaml

            out += yaml.safe_dump({"sweep": grid}, sort_keys=False)
        sys.stdout.write(out)
        return 0
    run = getattr(settings, "run", None)
    if run is not None:
        set_quiet(run.quiet)
    if grid:
        try:
            from mergekit_lab.sweeps import run_sweep
        except ImportError:  # pragma: no cover
            raise UserError("sweeps are not available in this build") from None
        out_dir = getattr(run, "output_dir", None)
        if out_dir is None:
            raise UserError("a sweep needs --output-dir (children go into its subfolders)")
        run_sweep(
            command=name,
            grid=grid,
            build_settings=lambda overrides: build_from_loaded(settings_cls, loaded, templates, overrides),
            run_fn=run_fn,
            output_dir=Path(out_dir),
            dry_run=bool(kwargs.get("dry_run")),
            console=console,
        )
        return 0
    run_fn(settings)
    return 0
