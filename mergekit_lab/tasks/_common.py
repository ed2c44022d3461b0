"""Helpers shared by the task families beyond sentence classification (NER, QA, SuperGLUE,
text-to-text, masked LM): file lookup with clear errors, JSONL reading, model building for
other ``AutoModelFor*`` classes, padding collators and a plain batched inference loop.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mergekit_lab.errors import UserError

# --------------------------------------------------------------------------------------------
# files


def find_folder(data_dir: Path, candidates: Sequence[str], task_name: str, expected: Sequence[str]) -> Path:
    """The first of ``data_dir/<candidate>`` (or ``data_dir`` itself) holding one of ``expected``."""
    if not data_dir.exists():
        raise UserError(f"data folder {str(data_dir)!r} does not exist", hint="check --data-dir")
    for cand in [data_dir / c for c in candidates] + [data_dir]:
        if cand.is_dir() and any((cand / e).exists() for e in expected):
            return cand
    where = " or ".join(f"{str(data_dir / c)!r}" for c in candidates) or repr(str(data_dir))
    raise UserError(f"no data files for {task_name} under {where}",
                    hint=f"expected files: {', '.join(expected)}")


def split_path(folder: Path, split: str, files: dict[str, Sequence[str] | str], task_name: str) -> Path:
    """The file of ``split`` in ``folder``; ``files`` maps split -> file name(s), first found wins."""
    if split not in files:
        raise UserError(f"task {task_name} has no split {split!r}", hint=f"splits: {', '.join(files)}")
    names = [files[split]] if isinstance(files[split], str) else list(files[split])
    for n in names:
        if (folder / n).exists():
            return folder / n
    every = sorted({n for v in files.values() for n in ([v] if isinstance(v, str) else v)})
    raise UserError(f"missing file {str(folder / names[0])!r} for split {split!r} of {task_name}",
                    hint=f"expected files in {str(folder)!r}: {', '.join(every)}")


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"line {i} of {path} is not JSON: {e.msg}", hint="use one JSON object a line") from None
    return rows


def hub_dataset(path: str, config: str | None, split: str, task_name: str):  # pragma: no cover - network
    """``datasets.load_dataset`` with a clear error when the Hub is not reachable."""
    import datasets

    try:
        return datasets.load_dataset(path, config, split=split)
    except Exception as e:  # noqa: BLE001 - the Hub raises many kinds
        raise UserError(f"could not load {task_name} split {split!r} from the Hub ({path}"
                        f"{'/' + config if config else ''}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                        hint="pass --data-dir with local files when offline") from None


# --------------------------------------------------------------------------------------------
# models


def build_auto_model(auto_cls, model_settings, *, seed: int, configure=None, tokenizer=None):
    """``auto_cls.from_pretrained`` on a model reference; the new head is initialised under ``seed``.

    ``configure(config)`` edits the config first (label maps, number of labels).
    """
    from transformers import AutoConfig

    from mergekit_lab.models.loading import _hub_kwargs, _load_error, resolve_model_ref

    ref = resolve_model_ref(model_settings.name_or_path)
    kw = _hub_kwargs(model_settings)
    try:
        config = AutoConfig.from_pretrained(ref, **kw)
    except (OSError, ValueError) as e:
        raise _load_error(ref, e) from None
    if configure is not None:
        configure(config)
    if getattr(config, "pad_token_id", None) is None and tokenizer is not None:
        config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return auto_cls.from_pretrained(ref, config=config, ignore_mismatched_sizes=True, **kw)
        except (OSError, ValueError) as e:
            raise _load_error(ref, e) from None


def load_auto_model(auto_cls, path: str, *, trust_remote_code: bool = False):
    from mergekit_lab.models.loading import _load_error, resolve_model_ref

    ref = resolve_model_ref(str(path))
    try:
        return auto_cls.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(ref, e) from None


def label_maps(config, label_names: Sequence[str]) -> None:
    config.num_labels = len(label_names)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {n: i for i, n in enumerate(label_names)}


# --------------------------------------------------------------------------------------------
# batching


def pad_collator(tokenizer, pad_values: dict[str, int]):
    """Collate features: list-valued keys in ``pad_values`` are right-padded with the given fill
    value (None: the tokenizer's pad id); scalar int keys are stacked; other keys are dropped."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for key, fill in pad_values.items():
            if key not in features[0] or features[0][key] is None:
                continue
            first = features[0][key]
            if isinstance(first, (list, tuple)):
                fill = pad_id if fill is None else fill
                n = max(len(f[key]) for f in features)
                rows = []
                for f in features:
                    seq = list(f[key])
                    pad = [fill] * (n - len(seq))
                    rows.append(seq + pad)
                batch[key] = torch.tensor(rows, dtype=torch.long)
            else:
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
        return batch

    return collate


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def iter_batches(model, encoded, collate, batch_size: int, description: str) -> Iterator[tuple[dict, list[dict]]]:
    """Yield (tensor batch on the model's device, raw features) over ``encoded`` in order.

    Evaluation of these families runs in the calling process (no cross-process gather): their
    post-processing needs every feature of an example together.
    """
    from mergekit_lab.runtime import progress

    device = model_device(model)
    n = len(encoded)
    steps = (n + batch_size - 1) // batch_size
    with progress(description, total=steps) as advance:
        for start in range(0, n, batch_size):
            feats = [encoded[i] for i in range(start, min(n, start + batch_size))]
            batch = {k: v.to(device) for k, v in collate(feats).items()}
            yield batch, feats
            advance()


class eval_mode:
    """Context manager: ``model.eval()`` and no grad inside, the previous mode restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        self.grad = torch.no_grad()
        self.grad.__enter__()
        return self.model

    def __exit__(self, *exc):
        self.grad.__exit__(*exc)
        if self.was_training:
            self.model.train()
        return False
