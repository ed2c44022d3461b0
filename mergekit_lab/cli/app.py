"""The `mklab` Typer application: every subcommand is mounted here with one line."""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from mergekit_lab import __version__

app = typer.Typer(
    name="mklab",
    help="mklab: merge, ensemble, distil and prompt-tune fine-tuned language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mklab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(  # noqa: UP045
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """mklab: merge, ensemble, distil and prompt-tune fine-tuned language models."""


@app.command("presets")
def presets(name: Optional[str] = typer.Argument(None, help="Print this preset's YAML.")) -> None:  # noqa: UP045
    """List the presets (command and one-line description), or print one."""
    from rich.console import Console
    from rich.table import Table

    from mergekit_lab.cli.common import report_error
    from mergekit_lab.errors import UserError
    from mergekit_lab.settings import list_presets, preset_description

    found = list_presets()
    if name:
        if name not in found:
            raise typer.Exit(report_error(UserError(f"unknown preset {name!r}",
                                                    hint=f"available: {', '.join(sorted(found))}"), False))
        sys.stdout.write(found[name].read_text(encoding="utf-8"))
        return
    table = Table(title="mklab presets")
    table.add_column("preset")
    table.add_column("command")
    table.add_column("description")
    for key, path in sorted(found.items()):
        cmd, desc = preset_description(path)
        table.add_row(key, cmd, desc)
    Console().print(table)


def _mount() -> None:
    import importlib

    for module in ("train", "eval", "merge", "similarity", "distill", "prompt_tune", "report"):
        try:
            mod = importlib.import_module(f"mergekit_lab.cli.{module}")
        except ModuleNotFoundError as e:
            if e.name == f"mergekit_lab.cli.{module}":
                continue  # that command is not part of this build
            raise
        mod.register(app)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import datasets
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


_mount()


def main() -> None:
    _quiet_libraries()
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
