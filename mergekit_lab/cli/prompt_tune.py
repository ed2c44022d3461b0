"""`mklab prompt-tune`: vanilla prompt tuning (PT) and decomposed prompt tuning (DePT)."""

from __future__ import annotations

import typer

from mergekit_lab.prompt.settings import PromptTuneSettings


def run_prompt_tune(settings: PromptTuneSettings) -> None:
    from mergekit_lab.prompt.run import prompt_tune

    prompt_tune(settings)


def register(app: typer.Typer) -> None:
    from mergekit_lab.cli.common import register_command

    register_command(
        app,
        "prompt-tune",
        PromptTuneSettings,
        run_prompt_tune,
        help="Train a soft prompt (pt) or a DePT module (dept) on a frozen model; saves a PEFT-layout "
        "adapter folder + results.json.",
    )
