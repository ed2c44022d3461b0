"""`mklab similarity`: score pool modules against a target (or every pool task), weights + figures."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from mergekit_lab.cli.common import register_command
    from mergekit_lab.similarity.run import run_similarity
    from mergekit_lab.similarity.settings import SimilaritySettings

    register_command(app, "similarity", SimilaritySettings, run_similarity,
                     help="Score source modules (LoRA / prefix / adapter) against a target task and write "
                          "ensembling weights (weights.json), scores.json and a heatmap / bar chart.")
