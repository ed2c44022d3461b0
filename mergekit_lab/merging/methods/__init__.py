"""Built-in merge methods; importing this package registers them."""

from mergekit_lab.merging.methods import (  # noqa: F401
    average,
    dare,
    fisher,
    regmean,
    slerp,
    task_arithmetic,
    ties,
)
