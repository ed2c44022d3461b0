"""The shared training loop."""

from mergekit_lab.training.loop import FitResult, LoopState, default_compute_loss, default_param_groups, fit  # noqa: F401
