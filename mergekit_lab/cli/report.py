"""``mklab report RUN_DIR...``: tables (rich, markdown, CSV, JSON) and plots from results.json."""

from __future__ import annotations

from pathlib import Path

import typer

from mergekit_lab.errors import UserError

FORMATS = ("table", "markdown", "csv", "json")
_SUFFIX_FORMAT = {".md": "markdown", ".markdown": "markdown", ".csv": "csv", ".json": "json"}


def _split_fields(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    out = [part.strip() for value in values for part in value.split(",") if part.strip()]
    return out or None


def report(
    runs: list[Path],
    *,
    fmt: str | None = None,
    output: Path | None = None,
    rows: list[str] | None = None,
    cols: list[str] | None = None,
    metric: str | None = None,
    children: bool = False,
    plot: Path | None = None,
) -> dict:
    """The report as a plain function: returns ``{"table", "text", "plots"}`` (text: the rendered
    markdown/CSV/JSON, or None for the rich table). The CLI prints or writes it."""
    from mergekit_lab import report as rep

    if not runs:
        raise UserError("no run folders given", hint="mklab report RUN_DIR [RUN_DIR ...]")
    if fmt is None:
        fmt = _SUFFIX_FORMAT.get(output.suffix.lower(), "markdown") if output is not None else "table"
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}", hint=f"choose one of: {', '.join(FORMATS)}")
    # a weights*.json file given directly is similarity input only (no results table)
    weight_files = [p for p in runs if p.is_file() and p.name.startswith("weights") and p.suffix == ".json"]
    result_paths = [p for p in runs if p not in weight_files]
    if weight_files and plot is None:
        raise UserError(
            f"{weight_files[0]} is a similarity weights file, not a results file",
            hint="add --plot DIR to draw its heatmap, or give the run folder",
        )
    records = rep.load_records(result_paths, children=children)
    similarity = rep.find_similarity(runs) if plot is not None else []
    table = None
    text = None
    if result_paths and (records or plot is None):
        table = rep.build_table(records, _split_fields(rows), _split_fields(cols), metric)
        if fmt == "markdown":
            text = rep.to_markdown(table)
        elif fmt == "csv":
            text = rep.to_csv(table)
        elif fmt == "json":
            text = rep.to_json(table)
    plots: list[Path] = []
    if plot is not None:
        plot.mkdir(parents=True, exist_ok=True)
        if table is not None:
            plots.append(rep.plot_bars(table, plot / "bars.png"))
            greedy = rep.plot_greedy_curve(records, plot / "greedy.png", metric)
            if greedy is not None:
                plots.append(greedy)
        for k, (name, targets, sources, matrix) in enumerate(similarity):
            suffix = "" if len(similarity) == 1 else f"_{k + 1}"
            title = f"similarity weights ({Path(name).parent.name}/{Path(name).name})"
            plots.append(
                rep.plot_heatmap(targets, sources, matrix, plot / f"similarity{suffix}.png", title=title)
            )
        if not plots:
            raise UserError("nothing to plot in the given results")
    return {"table": table, "text": text, "plots": plots, "format": fmt}


def register(app: typer.Typer) -> None:
    """Mount ``report`` on the mklab app."""

    @app.command("report", help="Tables and plots from results.json files (single runs, sweeps, merges).")
    def report_cmd(
        runs: list[Path] = typer.Argument(
            ..., metavar="RUN_DIR...", help="run folders or results.json files (sweeps too)"
        ),
        fmt: str = typer.Option(None, "--format", "-f", help="table (rich, default), markdown, csv or json"),
        output: Path = typer.Option(None, "--output", "-o", help="write the table to this file"),
        rows: list[str] = typer.Option(
            None, "--rows", help="fields down the side, e.g. model,kind (repeatable)"
        ),
        cols: list[str] = typer.Option(None, "--cols", help="fields across the top, e.g. task,split"),
        metric: str = typer.Option(
            None, "--metric", help="metric to show (default: each task's first metric)"
        ),
        children: bool = typer.Option(False, "--children", help="sweeps: show every child, not seed means"),
        plot: Path = typer.Option(None, "--plot", help="write PNG plots into this folder"),
    ) -> None:
        from rich.console import Console

        from mergekit_lab import report as rep

        err = Console(stderr=True)
        try:
            out = report(
                runs,
                fmt=fmt,
                output=output,
                rows=rows,
                cols=cols,
                metric=metric,
                children=children,
                plot=plot,
            )
        except UserError as exc:
            from mergekit_lab.cli.common import report_error

            raise typer.Exit(report_error(exc, False)) from None
        table = out["table"]
        if table is not None:
            if out["format"] == "table":
                Console().print(rep.to_rich(table, title=f"metric: {metric}" if metric else None))
            elif output is not None:
                output.parent.mkdir(parents=True, exist_ok=True)
                output.write_text(out["text"], encoding="utf-8")
                err.print(f"wrote {output}", highlight=False)
            else:
                typer.echo(out["text"], nl=False)
            if out["format"] == "table" and output is not None:
                output.parent.mkdir(parents=True, exist_ok=True)
                output.write_text(rep.to_markdown(table), encoding="utf-8")
                err.print(f"wrote {output}", highlight=False)
        for p in out["plots"]:
            err.print(f"wrote {p}", highlight=False)
