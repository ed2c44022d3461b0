"""Sweeps: grid expansion, child names, resume, seed aggregation (pure parts, no models)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from mergekit_lab.errors import UserError
from mergekit_lab.sweeps import (
    aggregate,
    aggregated_table_rows,
    child_name,
    expand_grid,
    format_value,
    plan_children,
    run_sweep,
    seed_keys,
)


def test_expand_grid_order_last_key_fastest():
    grid = {"learning_rate": [0.3, 0.4], "seed": [1, 2, 3]}
    combos = expand_grid(grid)
    assert combos == [
        {"learning_rate": 0.3, "seed": 1},
        {"learning_rate": 0.3, "seed": 2},
        {"learning_rate": 0.3, "seed": 3},
        {"learning_rate": 0.4, "seed": 1},
        {"learning_rate": 0.4, "seed": 2},
        {"learning_rate": 0.4, "seed": 3},
    ]
    # key order given by the user wins, not alphabetical
    assert [list(c) for c in expand_grid({"seed": [1], "alpha": [0.1]})] == [["seed", "alpha"]]


def test_child_names_short_dotted_keys_and_safe_values():
    assert child_name({"training.learning_rate": 0.0003, "seed": 1}) == "learning_rate=0.0003,seed=1"
    assert child_name({"data.task": "glue/sst2"}) == "task=glue_sst2"
    assert child_name({"x": 1e-05, "flag": True, "none": None}) == "x=1e-05,flag=true,none=null"
    assert child_name({"models": ["a/b", "c"]}) == "models=a_b+c"
    assert format_value("a b:c") == "a_b_c"
    long = child_name({"k": "v" * 400})
    assert len(long) <= 200 and long != child_name({"k": "v" * 401})


def test_plan_children_collisions_use_full_key_and_duplicates_fail():
    names = [n for n, _ in plan_children({"run.seed": [1], "data.seed": [2]})]
    assert names == ["run.seed=1,data.seed=2"]
    with pytest.raises(UserError, match="same folder name"):
        plan_children({"seed": [1, 1]})
    with pytest.raises(UserError, match="no values"):
        plan_children({"seed": []})
    with pytest.raises(UserError, match="output folder"):
        plan_children({"run.output_dir": ["a", "b"]})
    with pytest.raises(UserError, match="list of values"):
        plan_children({"seed": "1,2"})


def test_seed_keys():
    assert seed_keys(["learning_rate", "seed", "run.seed", "seeds"]) == ["seed", "run.seed"]


def _child(name, settings, metrics, rows=()):
    return {"name": name, "settings": settings, "metrics": metrics, "rows": list(rows)}


def test_aggregate_over_seed_matches_hand_computed():
    children = [
        _child(
            "lr=1,seed=1",
            {"lr": 1, "seed": 1},
            {"acc": 0.5, "loss": 2.0},
            [{"model": "m", "kind": "merged", "task": "t", "split": "dev", "metrics": {"f1": 0.1}}],
        ),
        _child(
            "lr=1,seed=2",
            {"lr": 1, "seed": 2},
            {"acc": 0.7, "loss": 4.0},
            [{"model": "m", "kind": "merged", "task": "t", "split": "dev", "metrics": {"f1": 0.3}}],
        ),
        _child(
            "lr=1,seed=3",
            {"lr": 1, "seed": 3},
            {"acc": 0.9, "loss": "n/a"},
            [{"model": "m", "kind": "merged", "task": "t", "split": "dev", "metrics": {"f1": 0.8}}],
        ),
        _child("lr=2,seed=1", {"lr": 2, "seed": 1}, {"acc": 0.25, "nested": {"x": 1}}),
    ]
    groups = aggregate(children)
    assert [g["settings"] for g in groups] == [{"lr": 1}, {"lr": 2}]
    g1, g2 = groups
    assert g1["n"] == 3 and g1["children"] == ["lr=1,seed=1", "lr=1,seed=2", "lr=1,seed=3"]
    # hand computed: mean(0.5,0.7,0.9)=0.7; sample var = (0.04+0+0.04)/2 = 0.04 -> std 0.2
    assert g1["metrics"]["acc"]["mean"] == pytest.approx(0.7)
    assert g1["metrics"]["acc"]["std"] == pytest.approx(0.2)
    assert g1["metrics"]["acc"]["n"] == 3
    # a non-numeric value is skipped: loss over 2 runs, mean 3, std sqrt(2)
    assert g1["metrics"]["loss"] == {"mean": 3.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    (row,) = g1["rows"]
    assert (row["model"], row["kind"], row["task"], row["split"]) == ("m", "merged", "t", "dev")
    # f1: mean 0.4, sample var ((0.3)^2 + 0.1^2 + 0.4^2)/2 = 0.13
    assert row["metrics"]["f1"]["mean"] == pytest.approx(0.4)
    assert row["metrics"]["f1"]["std"] == pytest.approx(math.sqrt(0.13))
    # n = 1: std is undefined (None), nested metrics are flattened
    assert g2["metrics"]["acc"] == {"mean": 0.25, "std": None, "n": 1}
    assert g2["metrics"]["nested.x"]["mean"] == 1.0

    table = aggregated_table_rows(groups)
    assert table[0]["metrics"] == {"f1": pytest.approx(0.4)}
    assert table[0]["settings"] == {"lr": 1} and table[0]["n"] == 3
    # group without rows -> one row from the run metrics
    assert table[1]["metrics"]["acc"] == 0.25 and table[1]["task"] is None


def test_rows_keep_extra_identity_fields_apart():
    rows_a = [
        {
            "model": "m",
            "kind": "merged",
            "task": "t",
            "split": "dev",
            "num_models": k,
            "metrics": {"acc": 0.1 * k},
            "seconds": 1.0 + k,
        }
        for k in (2, 3)
    ]
    rows_b = [{**r, "metrics": {"acc": r["metrics"]["acc"] + 0.2}, "seconds": 9.0} for r in rows_a]
    groups = aggregate([_child("seed=1", {"seed": 1}, {}, rows_a), _child("seed=2", {"seed": 2}, {}, rows_b)])
    rows = groups[0]["rows"]
    assert [r["num_models"] for r in rows] == [2, 3]
    assert rows[0]["metrics"]["acc"]["mean"] == pytest.approx(0.3)
    assert rows[1]["metrics"]["acc"]["mean"] == pytest.approx(0.4)


class _Run(BaseModel):
    model_config = ConfigDict(extra="forbid")
    output_dir: Path
    seed: int = 42
    learning_rate: float = 0.1


def _builder(calls):
    def build(overrides):
        calls.append(dict(overrides))
        values = {"output_dir": overrides.get("run.output_dir", Path("/nonexistent"))}
        for key, value in overrides.items():
            short = key.rsplit(".", 1)[-1]
            if short == "output_dir":
                continue
            if short not in _Run.model_fields:
                raise UserError(f"unknown settings key {key!r}")
            values[short] = value
        try:
            return _Run(**values)
        except Exception as exc:  # pydantic ValidationError -> UserError like the real builder
            raise UserError(f"bad value: {exc}") from exc

    return build


def _runner(ran):
    def run(settings: _Run):
        ran.append(settings.output_dir.name)
        settings.output_dir.mkdir(parents=True)
        result = {
            "schema_version": 1,
            "command": "fake",
            "metrics": {"score": settings.learning_rate * 10 + settings.seed},
            "rows": [
                {
                    "model": "m",
                    "kind": "individual",
                    "task": "t",
                    "split": "dev",
                    "metrics": {"acc": settings.seed / 10},
                }
            ],
        }
        (settings.output_dir / "results.json").write_text(json.dumps(result))

    return run


def test_run_sweep_runs_resumes_and_writes_parent(tmp_path):
    grid = {"training.learning_rate": [0.1, 0.2], "seed": [1, 2]}
    ran: list[str] = []
    parent = run_sweep("fake", grid, _builder([]), _runner(ran), tmp_path / "sw", False, None)
    expected = [
        "learning_rate=0.1,seed=1",
        "learning_rate=0.1,seed=2",
        "learning_rate=0.2,seed=1",
        "learning_rate=0.2,seed=2",
    ]
    assert ran == expected
    on_disk = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert on_disk["command"] == "sweep:fake"
    assert [c["name"] for c in on_disk["children"]] == expected
    assert on_disk["children"][1]["settings"] == {"training.learning_rate": 0.1, "seed": 2}
    assert on_disk["children"][1]["path"] == expected[1]
    agg = on_disk["aggregates"]
    assert [g["settings"] for g in agg] == [{"training.learning_rate": 0.1}, {"training.learning_rate": 0.2}]
    assert agg[0]["metrics"]["score"]["mean"] == pytest.approx(2.5)
    assert agg[0]["metrics"]["score"]["std"] == pytest.approx(math.sqrt(0.5))
    assert agg[1]["rows"][0]["metrics"]["acc"]["mean"] == pytest.approx(0.15)
    assert parent["aggregates"] == agg

    # interrupted sweep: remove one child; a re-run only runs that one
    (tmp_path / "sw" / expected[2] / "results.json").unlink()
    (tmp_path / "sw" / expected[2]).rmdir()
    ran.clear()
    again = run_sweep("fake", grid, _builder([]), _runner(ran), tmp_path / "sw", False, None)
    assert ran == [expected[2]]
    assert [c["status"] for c in again["children"]] == ["skipped", "skipped", "ran", "skipped"]
    assert again["aggregates"] == agg


def test_run_sweep_validates_every_child_before_running(tmp_path):
    ran: list[str] = []
    calls: list[dict] = []
    grid = {"learning_rate": [0.1, "oops"]}
    with pytest.raises(UserError, match="learning_rate=oops"):
        run_sweep("fake", grid, _builder(calls), _runner(ran), tmp_path / "sw", False, None)
    assert ran == []
    assert calls[0] == {"learning_rate": 0.1, "run.output_dir": tmp_path / "sw" / "learning_rate=0.1"}


def test_dry_run_lists_and_runs_nothing(tmp_path):
    ran: list[str] = []
    messages: list[str] = []

    class Console:
        def print(self, msg, **kwargs):
            messages.append(str(msg))

    out = run_sweep("fake", {"seed": [1, 2]}, _builder([]), _runner(ran), tmp_path / "sw", True, Console())
    assert ran == [] and not (tmp_path / "sw").exists()
    assert [c["name"] for c in out["children"]] == ["seed=1", "seed=2"]
    assert any("seed=2" in m and "to run" in m for m in messages)


def test_child_without_results_is_an_error(tmp_path):
    with pytest.raises(UserError, match="without writing"):
        run_sweep("fake", {"seed": [1]}, _builder([]), lambda s: None, tmp_path / "sw", False, None)


def test_rows_naming_the_child_folder_pool_across_seeds_and_values_are_validated(tmp_path):
    def run(settings: _Run):
        settings.output_dir.mkdir(parents=True)
        row = {
            "model": str(settings.output_dir),
            "kind": "trained",
            "task": "t",
            "split": "validation",
            "metrics": {"acc": settings.seed / 10},
        }
        (settings.output_dir / "results.json").write_text(json.dumps({"schema_version": 1, "rows": [row]}))

    out = tmp_path / "sw"
    # "2e-1" is a string for YAML 1.1; the recorded delta holds the validated float
    parent = run_sweep(
        "fake", {"learning_rate": ["2e-1"], "seed": [1, 3]}, _builder([]), run, out, False, None
    )
    assert [c["name"] for c in parent["children"]] == [
        "learning_rate=2e-1,seed=1",
        "learning_rate=2e-1,seed=3",
    ]
    assert parent["children"][0]["settings"] == {"learning_rate": 0.2, "seed": 1}
    # children keep their own rows; the aggregate pools them under "<out>/learning_rate=2e-1,seed=*"
    assert parent["children"][1]["rows"][0]["model"] == str(out / "learning_rate=2e-1,seed=3")
    (group,) = parent["aggregates"]
    (row,) = group["rows"]
    assert row["model"] == str(out / "learning_rate=2e-1,seed=*")
    assert row["metrics"]["acc"] == {
        "mean": pytest.approx(0.2),
        "std": pytest.approx(math.sqrt(0.02)),
        "n": 2,
    }
    assert parent["rows"][0]["std"]["acc"] == pytest.approx(math.sqrt(0.02))


def test_sweep_refuses_a_folder_holding_another_run(tmp_path):
    out = tmp_path / "sw"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"schema_version": 1, "command": "merge"}))
    ran: list[str] = []
    with pytest.raises(UserError, match="belongs to another run"):
        run_sweep("fake", {"seed": [1]}, _builder([]), _runner(ran), out, False, None)
    assert ran == []


def test_rows_with_seed_specific_paths_pool_by_position():
    def rows(seed, accs):
        return [
            {
                "model": f"zoo/glue-sst2-seed{seed}-{'ab' if seed == 1 else 'cd'}12",
                "kind": "individual",
                "task": "glue/sst2",
                "split": "validation",
                "metrics": {"acc": accs[0]},
            },
            {
                "model": "average",
                "kind": "merged",
                "task": "glue/sst2",
                "split": "validation",
                "metrics": {"acc": accs[1]},
            },
        ]

    (group,) = aggregate(
        [
            _child("seed=1", {"seed": 1}, {}, rows(1, (0.8, 0.6))),
            _child("seed=2", {"seed": 2}, {}, rows(2, (0.9, 0.7))),
        ]
    )
    first, second = group["rows"]
    assert first["model"] == "zoo/glue-sst2-seed*12" and first["metrics"]["acc"]["n"] == 2
    assert first["metrics"]["acc"]["mean"] == pytest.approx(0.85)
    assert second["model"] == "average" and second["metrics"]["acc"]["mean"] == pytest.approx(0.65)
