"""Task registry (see base.py); families register in their own modules."""

from mergekit_lab.tasks.base import (  # noqa: F401
    Task,
    canonical_split,
    get_task,
    list_tasks,
    register_task,
    register_task_prefix,
    resolve_data_dir,
    sample_data_dir,
)
