"""`mklab binarize`, `count-tokens`, `extract-student`, `fit-mlm-head`, `distill`: thin wrappers over mergekit_lab.distill."""

from __future__ import annotations

import typer


def _binarize(settings):
    from mergekit_lab.distill.run import run_binarize

    run_binarize(settings)


def _count(settings):
    from mergekit_lab.distill.run import run_count_tokens

    run_count_tokens(settings)


def _extract(settings):
    from mergekit_lab.distill.run import run_extract_student

    run_extract_student(settings)


def _head(settings):
    from mergekit_lab.distill.run import run_fit_mlm_head

    run_fit_mlm_head(settings)


def _distill(settings):
    from mergekit_lab.distill.run import run_distill

    run_distill(settings)


def register(app: typer.Typer) -> None:
    from mergekit_lab.cli.common import register_command
    from mergekit_lab.distill.settings import (
        BinarizeSettings,
        CountTokensSettings,
        DistillSettings,
        ExtractStudentSettings,
        FitMlmHeadSettings,
    )

    register_command(app, "binarize", BinarizeSettings, _binarize,
                     help="Tokenize a corpus (files, save_to_disk folder or Hub dataset) into memory-mappable .npy files.")
    register_command(app, "count-tokens", CountTokensSettings, _count,
                     help="Count tokens per vocabulary id of a binarized corpus (for MLM masking).")
    register_command(app, "extract-student", ExtractStudentSettings, _extract,
                     help="Initialise a k-layer student (same architecture or DistilBERT) from a teacher's layers.")
    register_command(app, "fit-mlm-head", FitMlmHeadSettings, _head,
                     help="Train a masked-LM head for an encoder without one (e.g. builtin:minilm) so it can teach.")
    register_command(app, "distill", DistillSettings, _distill,
                     help="Distil a teacher into a student (DistilBERT losses, optionally DIITO interchange "
                          "intervention losses) on Accelerate.")
