"""Prompt tuning (PT, on PEFT's prompt tuning) and DePT (decomposed prompt tuning).

See :mod:`mergekit_lab.prompt.model` for what the modules compute,
:mod:`mergekit_lab.prompt.io` for the folder format and :mod:`mergekit_lab.prompt.budget` for
``--match-pt-length``.
"""

from mergekit_lab.prompt.budget import (
    BudgetMatch,
    BudgetOption,
    dept_prompt_params,
    exact_options,
    match_pt_length,
    pt_prompt_params,
)
from mergekit_lab.prompt.build import build_prompt_model, make_prompt_config
from mergekit_lab.prompt.config import DEPT_PEFT_TYPE, METHODS, PADDING_MODES, DePTConfig
from mergekit_lab.prompt.init import init_from_module, init_prompt
from mergekit_lab.prompt.io import is_prompt_module, load_prompt_module, save_prompt_module
from mergekit_lab.prompt.model import PromptTunedModel, infer_task_type
from mergekit_lab.prompt.optim import param_groups

__all__ = [
    "BudgetMatch",
    "BudgetOption",
    "DEPT_PEFT_TYPE",
    "DePTConfig",
    "METHODS",
    "PADDING_MODES",
    "PromptTunedModel",
    "build_prompt_model",
    "dept_prompt_params",
    "exact_options",
    "infer_task_type",
    "init_from_module",
    "init_prompt",
    "is_prompt_module",
    "load_prompt_module",
    "make_prompt_config",
    "match_pt_length",
    "param_groups",
    "pt_prompt_params",
    "save_prompt_module",
]
