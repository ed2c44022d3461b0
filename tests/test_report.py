"""`mklab report`: tables from fixture results files (exact markdown / CSV), plots, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mergekit_lab.cli import report as report_cli
from mergekit_lab.errors import UserError
from mergekit_lab.report import (
    build_table,
    find_similarity,
    load_records,
    lower_is_better,
    plot_bars,
    plot_greedy_curve,
    plot_heatmap,
    to_csv,
    to_json,
    to_markdown,
    to_rich,
)


def _write(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(data))
    return folder


def _row(model, kind, task, metrics, split="validation", **extra):
    return {"model": model, "kind": kind, "task": task, "split": split, "metrics": metrics, **extra}


@pytest.fixture
def merge_run(tmp_path):
    rows = [
        _row("sst2", "individual", "glue/sst2", {"accuracy": 0.91}),
        _row("sst2", "individual", "glue/cola", {"matthews_correlation": 0.02}),
        _row("cola", "individual", "glue/sst2", {"accuracy": 0.52}),
        _row("cola", "individual", "glue/cola", {"matthews_correlation": 0.45}),
        _row("average", "merged", "glue/sst2", {"accuracy": 0.80}),
        _row("average", "merged", "glue/cola", {"matthews_correlation": 0.10}),
        _row("regmean", "merged", "glue/sst2", {"accuracy": 0.88}),
        _row("regmean", "merged", "glue/cola", {"matthews_correlation": 0.30}),
    ]
    return _write(tmp_path / "m1", {"schema_version": 1, "command": "merge", "metrics": {}, "rows": rows})


def test_markdown_exact(merge_run):
    table = build_table(load_records([merge_run]))
    assert to_markdown(table) == (
        "| model | kind | glue/sst2 (accuracy) | glue/cola (matthews_correlation) |\n"
        "|---|---|---:|---:|\n"
        "| sst2 | individual | **0.9100** | 0.0200 |\n"
        "| cola | individual | 0.5200 | **0.4500** |\n"
        "| average | merged | 0.8000 | 0.1000 |\n"
        "| regmean | merged | 0.8800 | 0.3000 |\n"
    )


def test_csv_exact_with_rows_and_cols_swapped(merge_run):
    table = build_table(load_records([merge_run]), rows=["task"], cols=["model"])
    assert to_csv(table) == (
        "task,sst2,cola,average,regmean\nglue/sst2,0.91,0.52,0.8,0.88\nglue/cola,0.02,0.45,0.1,0.3\n"
    )
    # one metric for all: the header carries no metric name; cells without it stay empty
    table = build_table(load_records([merge_run]), rows=["model"], cols=["task"], metric="accuracy")
    assert to_csv(table) == "model,glue/sst2\nsst2,0.91\ncola,0.52\naverage,0.8\nregmean,0.88\n"
    data = json.loads(to_json(table))
    assert data["metric"] == "accuracy"
    assert data["data"][0]["cells"]["glue/sst2"] == {
        "value": 0.91,
        "std": None,
        "n": None,
        "metric": "accuracy",
        "best": True,
    }


def test_lower_is_better_metric_highlights_minimum(tmp_path):
    run = _write(
        tmp_path / "r",
        {
            "schema_version": 1,
            "command": "eval",
            "metrics": {},
            "rows": [
                _row("a", "individual", "text:x", {"perplexity": 12.0}),
                _row("b", "individual", "text:x", {"perplexity": 9.5}),
            ],
        },
    )
    table = build_table(load_records([run]))
    assert lower_is_better("eval_loss") and not lower_is_better("accuracy")
    assert "| b | **9.5000** |" in to_markdown(table)


def _sweep_parent(tmp_path) -> Path:
    """A sweep parent as sweeps.run_sweep writes it (aggregated rows with std and n)."""
    children = []
    for lr in (0.1, 0.2):
        for seed in (1, 2):
            name = f"learning_rate={lr},seed={seed}"
            acc = lr + seed / 10
            child = _write(
                tmp_path / "sw" / name,
                {
                    "schema_version": 1,
                    "command": "train",
                    "metrics": {"accuracy": acc},
                    "rows": [_row("m", "individual", "glue/sst2", {"accuracy": acc})],
                },
            )
            children.append(
                {
                    "name": name,
                    "path": child.name,
                    "settings": {"training.learning_rate": lr, "seed": seed},
                    "metrics": {"accuracy": acc},
                    "rows": [],
                }
            )
    from mergekit_lab.sweeps import aggregate, aggregated_table_rows

    for c in children:
        c["rows"] = json.loads((tmp_path / "sw" / c["path"] / "results.json").read_text())["rows"]
    groups = aggregate(children)
    return _write(
        tmp_path / "sw",
        {
            "schema_version": 1,
            "command": "sweep:train",
            "metrics": {},
            "rows": aggregated_table_rows(groups),
            "children": children,
            "aggregates": groups,
        },
    )


def test_sweep_report_shows_mean_and_std(tmp_path):
    parent = _sweep_parent(tmp_path)
    table = build_table(load_records([parent]))
    # seeds 1,2 -> acc lr+0.1, lr+0.2: mean lr+0.15, sample std sqrt(0.005)=0.0707
    assert to_markdown(table) == (
        "| learning_rate | glue/sst2 (accuracy) |\n"
        "|---|---:|\n"
        "| 0.1 | 0.2500 ± 0.0707 |\n"
        "| 0.2 | **0.3500 ± 0.0707** |\n"
    )
    csv_text = to_csv(table).splitlines()
    assert csv_text[0] == "learning_rate,glue/sst2 (accuracy),glue/sst2 (accuracy) std"
    assert csv_text[1].startswith("0.1,0.25")
    # --children: one row per child, the seed becomes a field
    table = build_table(load_records([parent], children=True), rows=["learning_rate", "seed"])
    assert [r for r in table.row_keys] == [(0.1, 1), (0.1, 2), (0.2, 1), (0.2, 2)]


def test_same_cell_twice_names_the_differing_field(tmp_path):
    run = _write(
        tmp_path / "r",
        {
            "schema_version": 1,
            "command": "merge",
            "metrics": {},
            "rows": [
                _row("avg", "merged", "t", {"acc": 0.1}, num_models=2),
                _row("avg", "merged", "t", {"acc": 0.2}, num_models=3),
            ],
        },
    )
    with pytest.raises(UserError, match="num_models"):
        build_table(load_records([run]), rows=["model"], cols=["task"])
    with pytest.raises(UserError, match="unknown report field 'nope'"):
        build_table(load_records([run]), rows=["nope"])
    with pytest.raises(UserError, match="no result has the metric 'f1'"):
        build_table(load_records([run]), metric="f1")


def test_run_without_rows_uses_run_metrics(tmp_path):
    a = _write(
        tmp_path / "a",
        {
            "schema_version": 1,
            "command": "train",
            "metrics": {"accuracy": 0.5},
            "settings": {"data": {"task": "glue/rte"}},
            "rows": [],
        },
    )
    b = _write(
        tmp_path / "b",
        {
            "schema_version": 1,
            "command": "train",
            "metrics": {"accuracy": 0.75},
            "settings": {"data": {"task": "glue/rte"}},
        },
    )
    assert to_markdown(build_table(load_records([a, b / "results.json"]))) == (
        "| model | glue/rte (accuracy) |\n|---|---:|\n| a | 0.5000 |\n| b | **0.7500** |\n"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no results file"),
        ("{not json", "unreadable results file"),
        ("[1, 2]", "not a JSON object"),
        ('{"command": "x"}', "no schema_version"),
        ('{"schema_version": 99, "command": "x"}', "schema version 99"),
        ('{"schema_version": 1, "rows": {"a": 1}}', "'rows' must be a list"),
        ('{"schema_version": 1, "metrics": [1]}', "'metrics' must be an object"),
    ],
)
def test_bad_results_files_are_named(tmp_path, content, message):
    folder = tmp_path / "bad"
    folder.mkdir()
    if content is not None:
        (folder / "results.json").write_text(content)
    with pytest.raises(UserError, match=message) as info:
        load_records([folder])
    assert str(folder / "results.json") in str(info.value)


def _png_ok(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _greedy_run(tmp_path) -> Path:
    """Rows as `mklab merge --strategy greedy` writes them (merging/experiment.py add_rows)."""
    names = ["a", "b", "c", "d"]
    rows = [_row(n, "individual", f"emotion/{n}", {"f1": 0.7}, domain="in", models=[n]) for n in names[:3]]
    for k in (2, 3):
        combo = names[:k]
        label = "+".join(combo)
        for task in ("emotion/a", "emotion/b", "emotion/d"):
            dom = "in" if task.split("/")[1] in combo else "ood"
            for method, base in (("average", 0.5), ("regmean", 0.6)):
                rows.append(
                    _row(
                        f"{method}[{label}]",
                        "merged",
                        task,
                        {"f1": base - 0.02 * k, "precision": 0.0},
                        domain=dom,
                        models=combo,
                        method=method,
                        step=k,
                    )
                )
            rows.append(
                _row(
                    f"ensemble[{label}]",
                    "ensemble",
                    task,
                    {"f1": 0.4 + 0.01 * k},
                    domain=dom,
                    models=combo,
                    step=k,
                )
            )
            rows.append(
                _row(
                    f"ensemble[{label}]",
                    "ensemble",
                    task,
                    {"f1": 0.0},
                    split="test",
                    domain=dom,
                    models=combo,
                    step=k,
                )
            )
    return _write(tmp_path / "greedy", {"schema_version": 1, "command": "merge", "metrics": {}, "rows": rows})


def test_plots_written(tmp_path, merge_run):
    parent = _sweep_parent(tmp_path)
    _png_ok(plot_bars(build_table(load_records([parent])), tmp_path / "p" / "bars.png"))
    records = load_records([_greedy_run(tmp_path)])
    from mergekit_lab.report import greedy_points

    pts = greedy_points(records)
    # step 2 merges a+b: emotion/a and emotion/b are in-domain, emotion/d is OOD
    assert pts[("in", "regmean")] == [(2, pytest.approx(0.56)), (3, pytest.approx(0.54))]
    assert pts[("ood", "average")] == [(2, pytest.approx(0.46)), (3, pytest.approx(0.44))]
    assert pts[("in", "ensemble")] == [
        (2, pytest.approx(0.42)),
        (3, pytest.approx(0.43)),
    ]  # test split ignored
    assert set(pts) == {(d, m) for d in ("in", "ood") for m in ("average", "regmean", "ensemble")}
    _png_ok(plot_greedy_curve(records, tmp_path / "p" / "greedy.png"))
    assert plot_greedy_curve(load_records([merge_run]), tmp_path / "p" / "none.png") is None
    _png_ok(plot_heatmap(["a", "b"], ["a", "b"], [[None, 0.7], [0.3, None]], tmp_path / "p" / "heat.png"))


def test_greedy_merge_table_default_layout(tmp_path):
    table = build_table(load_records([_greedy_run(tmp_path)]))
    # domain and step follow from model and task: rows stay model, kind; the splits become columns
    assert table.row_fields == ["model", "kind"] and table.col_fields == ["task", "split"]
    assert table.row_keys[3] == ("average[a+b]", "merged")


def test_similarity_layouts(tmp_path):
    d = tmp_path / "sim"
    d.mkdir()
    (d / "weights.json").write_text(json.dumps({"weights": {"rte": {"sst2": 0.6, "cola": 0.4}}}))
    ((name, targets, sources, matrix),) = find_similarity([d])
    assert (targets, sources, matrix) == (["rte"], ["sst2", "cola"], [[0.6, 0.4]])
    (d / "weights.json").write_text(
        json.dumps({"targets": ["a", "b"], "sources": ["a", "b"], "weights": [[None, 1.0], [1.0]]})
    )
    with pytest.raises(UserError, match="2 targets x 2 sources"):
        find_similarity([d])
    # as `mklab similarity` writes them: one target, and the --all-targets matrix
    (d / "weights.json").write_text(
        json.dumps(
            {
                "format": "mklab-similarity-weights",
                "target": "glue/rte",
                "weights": {"sst2": 0.25, "cola": 0.75},
            }
        )
    )
    assert find_similarity([d])[0][1:] == (["glue/rte"], ["sst2", "cola"], [[0.25, 0.75]])
    (d / "weights_loss.json").write_text(
        json.dumps(
            {
                "format": "mklab-similarity-weights-matrix",
                "rows": "targets",
                "columns": ["sst2", "cola", "rte"],
                "matrix": {"glue/sst2": {"cola": 0.5, "rte": 0.5}, "glue/rte": {"sst2": 0.9, "cola": 0.1}},
            }
        )
    )
    found = find_similarity([d])
    assert [Path(f).name for f, *_ in found] == ["weights.json", "weights_loss.json"]
    assert found[1][1:] == (
        ["glue/sst2", "glue/rte"],
        ["sst2", "cola", "rte"],
        [[None, 0.5, 0.5], [0.9, 0.1, None]],
    )


def _app() -> typer.Typer:
    app = typer.Typer()
    report_cli.register(app)

    @app.command("other")
    def _other() -> None:  # a second command so typer keeps `report` as a subcommand
        pass

    return app


def test_cli_markdown_csv_and_plots(tmp_path, merge_run):
    runner = CliRunner()
    app = _app()
    res = runner.invoke(app, ["report", str(merge_run), "--format", "markdown"])
    assert res.exit_code == 0, res.output
    assert "| regmean | merged | 0.8800 | 0.3000 |" in res.output
    out = tmp_path / "t.csv"
    res = runner.invoke(
        app, ["report", str(merge_run), "--output", str(out), "--rows", "task", "--cols", "model"]
    )
    assert res.exit_code == 0, res.output
    assert out.read_text().startswith("task,sst2,cola,average,regmean\n")
    res = runner.invoke(app, ["report", str(merge_run), "--plot", str(tmp_path / "plots")])
    assert res.exit_code == 0, res.output
    assert "regmean" in res.output
    _png_ok(tmp_path / "plots" / "bars.png")
    res = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert res.exit_code == 2
    assert "no results file" in res.output


def test_default_layout_prefers_sweep_keys_over_child_paths(tmp_path):
    parent = _sweep_parent(tmp_path)
    data = json.loads((parent / "results.json").read_text())
    for row in data["rows"]:  # like `train`, whose row model is the run's own folder
        row["model"] = f"{parent}/learning_rate={row['settings']['training.learning_rate']},seed=*"
    (parent / "results.json").write_text(json.dumps(data))
    table = build_table(load_records([parent]))
    assert table.row_fields == ["learning_rate"] and table.col_fields == ["task"]
    merged = build_table(load_records([parent, tmp_path / "sw" / "learning_rate=0.1,seed=1"]))
    assert merged.row_fields[0] == "learning_rate" and len(merged.row_keys) == 3


def test_rich_table_keeps_bracketed_labels(tmp_path):
    from rich.console import Console

    table = build_table(load_records([_greedy_run(tmp_path)]), metric="f1")
    console = Console(width=300, record=True)
    console.print(to_rich(table))
    assert "regmean[a+b+c]" in console.export_text()


def test_cli_similarity_heatmap_from_weights_file(tmp_path, merge_run):
    wf = tmp_path / "weights.json"
    wf.write_text(
        json.dumps(
            {
                "format": "mklab-similarity-weights-matrix",
                "columns": ["a", "b"],
                "matrix": {"a": {"b": 1.0}, "b": {"a": 1.0}},
            }
        )
    )
    runner = CliRunner()
    res = runner.invoke(_app(), ["report", str(wf), str(merge_run), "--plot", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    _png_ok(tmp_path / "p" / "similarity.png")
    _png_ok(tmp_path / "p" / "bars.png")
    res = runner.invoke(_app(), ["report", str(wf)])
    assert res.exit_code == 2 and "similarity weights file" in res.output


def test_nested_run_metrics_are_flattened(tmp_path):
    run = _write(
        tmp_path / "t",
        {
            "schema_version": 1,
            "command": "train",
            "rows": [],
            "metrics": {"validation": {"accuracy": 0.5}, "train_loss": 0.7, "note": "x"},
        },
    )
    (rec,) = load_records([run])
    assert rec["metrics"] == {"validation.accuracy": 0.5, "train_loss": 0.7}


def test_no_highlight_when_whole_column_ties(tmp_path):
    run = _write(
        tmp_path / "r",
        {
            "schema_version": 1,
            "command": "merge",
            "metrics": {},
            "rows": [
                _row("a", "merged", "t", {"acc": 0.5}),
                _row("b", "merged", "t", {"acc": 0.5}),
                _row("c", "merged", "t", {"acc": 0.25}),
                _row("a", "merged", "u", {"acc": 0.5}),
                _row("b", "merged", "u", {"acc": 0.5}),
            ],
        },
    )
    assert to_markdown(build_table(load_records([run]))) == (
        "| model | t (acc) | u (acc) |\n|---|---:|---:|\n"
        "| a | **0.5000** | 0.5000 |\n| b | **0.5000** | 0.5000 |\n| c | 0.2500 |  |\n"
    )
