"""Model merging: registered methods, statistics (RegMean Grams, Fisher) and a streaming engine.

    from mergekit_lab.merging import merge_models, compute_grams, save_statistics
    grams, info = compute_grams(model, batches)               # per model, on its own data
    merge_models([dir_a, dir_b], "regmean", {"alpha": 0.9}, statistics=[ga, gb],
                 heads="keep", output_dir="merged/")
"""

from mergekit_lab.merging.engine import MergeResult, merge_models
from mergekit_lab.merging.io import open_checkpoint, save_state_dict_sharded
from mergekit_lab.merging.registry import (
    MergeMethod,
    MergeParams,
    TensorJob,
    get_method_class,
    list_methods,
    make_method,
    method_help,
    register_method,
)
from mergekit_lab.merging.statistics import (
    StatisticsFile,
    compute_fisher,
    compute_grams,
    ensure_statistics,
    load_statistics,
    save_statistics,
    statistics_path,
)

__all__ = [
    "MergeMethod",
    "MergeParams",
    "MergeResult",
    "StatisticsFile",
    "TensorJob",
    "compute_fisher",
    "compute_grams",
    "ensure_statistics",
    "get_method_class",
    "list_methods",
    "load_statistics",
    "make_method",
    "merge_models",
    "method_help",
    "open_checkpoint",
    "register_method",
    "save_state_dict_sharded",
    "save_statistics",
    "statistics_path",
]
