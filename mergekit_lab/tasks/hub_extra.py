"""More classification sets used by the DePT paper, by name from the Hub (or local files):

=====================  ============================================  ==========================
task                   Hub dataset (config)                          text fields -> labels
=====================  ============================================  ==========================
``hub/winogrande``     ``allenai/winogrande`` (``winogrande_xl``)    sentence / "option1 [or]
                                                                     option2" -> option1, option2
``hub/yelp_polarity``  ``fancyzhx/yelp_polarity``                    text -> negative, positive
``hub/scitail``        ``allenai/scitail`` (``snli_format``)         premise / hypothesis ->
                                                                     entails, neutral
``hub/paws``           ``google-research-datasets/paws``             sentence1 / sentence2 ->
                       (``labeled_final``)                           not_paraphrase, paraphrase
=====================  ============================================  ==========================

Splits without a Hub counterpart: Yelp-2 has no validation split, so ``validation`` is the
Hub's test split (as in the DePT setup); WinoGrande's test labels are hidden (evaluate on
validation). With ``--data-dir``, ``<data_dir>/<name>/{train,validation|dev,test}.jsonl`` with
the Hub's column names is read instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mergekit_lab.errors import UserError
from mergekit_lab.tasks._common import find_folder, hub_dataset, read_jsonl, split_path
from mergekit_lab.tasks.base import Task, register_task


@dataclass(frozen=True)
class HubSpec:
    path: str
    config: str | None
    labels: tuple[str, ...]
    fields: tuple[str, ...]
    splits: tuple[tuple[str, str], ...] = (("train", "train"), ("validation", "validation"), ("test", "test"))


SPECS = {
    "winogrande": HubSpec("allenai/winogrande", "winogrande_xl", ("option1", "option2"), ("sentence", "options")),
    "yelp_polarity": HubSpec("fancyzhx/yelp_polarity", None, ("negative", "positive"), ("text",),
                             (("train", "train"), ("validation", "test"), ("test", "test"))),
    "scitail": HubSpec("allenai/scitail", "snli_format", ("entails", "neutral"), ("sentence1", "sentence2")),
    "paws": HubSpec("google-research-datasets/paws", "labeled_final", ("not_paraphrase", "paraphrase"),
                    ("sentence1", "sentence2")),
}
LOCAL_FILES = {"train": ["train.jsonl"], "validation": ["validation.jsonl", "dev.jsonl"], "test": ["test.jsonl"]}


def convert(key: str, rec: dict, where: str) -> dict:
    """A Hub-format record -> {text fields..., label}."""
    spec = SPECS[key]
    if key == "winogrande":
        ans = str(rec.get("answer", "")).strip()
        label = {"1": 0, "2": 1}.get(ans)
        out = {"sentence": rec["sentence"], "options": f"{rec['option1']} [or] {rec['option2']}", "label": label}
    elif key == "yelp_polarity":
        out = {"text": rec["text"], "label": rec.get("label")}
    elif key == "scitail":
        lab = rec.get("gold_label", rec.get("label"))
        out = {"sentence1": rec["sentence1"], "sentence2": rec["sentence2"],
               "label": spec.labels.index(lab) if lab in spec.labels else lab}
    else:
        out = {"sentence1": rec["sentence1"], "sentence2": rec["sentence2"], "label": rec.get("label")}
    if not isinstance(out["label"], int) or not 0 <= out["label"] < len(spec.labels):
        raise UserError(f"{where} has no valid label for {key} ({', '.join(spec.labels)}): {out['label']!r}",
                        hint="labeled splits only (WinoGrande's test split has no answers)")
    return out


def _loader(key: str):
    spec = SPECS[key]

    def load(task: Task, split: str, data_dir: Path | None):
        from datasets import Dataset

        if data_dir is not None:
            folder = find_folder(data_dir, [key], task.name, [n for v in LOCAL_FILES.values() for n in v])
            path = split_path(folder, split, LOCAL_FILES, task.name)
            records = [(r, f"line {i} of {path}") for i, r in enumerate(read_jsonl(path), 1)]
        else:  # pragma: no cover - network
            hub_split = dict(spec.splits).get(split)
            if hub_split is None:
                raise UserError(f"task {task.name} has no split {split!r}", hint="splits: train, validation, test")
            ds = hub_dataset(spec.path, spec.config, hub_split, task.name)
            records = [(r, f"record {i} of {spec.path} {hub_split}") for i, r in enumerate(ds)]
        rows = [convert(key, r, where) for r, where in records]
        return Dataset.from_dict({k: [r[k] for r in rows] for k in (*spec.fields, "label")})

    return load


for _key, _spec in SPECS.items():
    register_task(Task(name=f"hub/{_key}", problem_type="single_label_classification", label_names=list(_spec.labels),
                       text_fields=_spec.fields, metric_names=["accuracy"], loader=_loader(_key),
                       description=f"{_spec.path} ({_spec.config or 'default'})"))
