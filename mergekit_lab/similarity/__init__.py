"""Similarity-weighted ensembling of parameter-efficient modules (Lv et al. 2023).

- :mod:`~mergekit_lab.similarity.measures`: the registered measures (sign, default temperature)
- :mod:`~mergekit_lab.similarity.scoring`: scoring sources on a target (short tunes via ``fit``)
- :mod:`~mergekit_lab.similarity.weights`: softmax weights, baselines, the weights file
- :mod:`~mergekit_lab.similarity.ensemble`: weighted averaging of module folders (+ exact LoRA)
- :mod:`~mergekit_lab.similarity.plots`: heatmap and bar chart
"""

from mergekit_lab.similarity.ensemble import ensemble_modules, is_module_pool
from mergekit_lab.similarity.measures import Measure, Score, get_measure, list_measures, register_measure
from mergekit_lab.similarity.weights import read_weights_file, softmax_weights

__all__ = ["Measure", "Score", "ensemble_modules", "get_measure", "is_module_pool", "list_measures",
           "read_weights_file", "register_measure", "softmax_weights"]
