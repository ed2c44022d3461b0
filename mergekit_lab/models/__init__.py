"""Model references, loading with task heads, and the zoo of fine-tuned models."""

from mergekit_lab.models.loading import (  # noqa: F401
    builtin_path,
    load_model_for_task,
    load_tokenizer,
    load_trained,
    resolve_model_ref,
)
