"""Shared settings: pydantic groups, presets, YAML configs, ``--set`` overrides and templates.

Every command has ONE settings class (a :class:`CommandSettings` whose fields are groups such as
``run``, ``model``, ``data``, ``training``). Values come from, lowest to highest precedence::

    defaults < --preset NAME < --config FILE.yaml (repeatable, deep-merged) < --set a.b=v < flags

``--template seed=1`` fills ``{seed}`` placeholders in every string value. Unknown keys, wrong
types and missing required values raise :class:`~mergekit_lab.errors.UserError` naming the key
and where it came from, before any work starts.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergekit_lab.errors import UserError

# --------------------------------------------------------------------------------------------
# groups


class Section(BaseModel):
    """A settings group: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class RunSettings(Section):
    output_dir: Path | None = Field(None, description="Where the run's folder (model, results.json) goes.")
    seed: int = Field(42, description="Random seed (data order, head init, dropout).")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Numeric precision (mixed precision for bf16/fp16).")
    cpu_only: bool = Field(False, description="Run on the CPU even when a GPU is present.")
    quiet: bool = Field(False, description="No progress bars or info lines.")
    debug: bool = Field(False, description="Show full tracebacks on errors.")
    overwrite: bool = Field(False, description="Replace an existing output folder.")
    resume: bool = Field(False, description="Continue an interrupted run from its last checkpoint.")


class ModelSettings(Section):
    name_or_path: str | None = Field(
        None,
        description="Model: a local folder, a Hub id, or builtin:minilm (embedded).",
        json_schema_extra={"flag": "--model"},
    )
    tokenizer: str | None = Field(None, description="Tokenizer reference if it differs from the model's.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Allow custom code from the Hub (off unless asked for).")


class DataSettings(Section):
    task: str | None = Field(None, description="Task name, e.g. glue/sst2, emotion/isear, file:data.csv.")
    data_dir: str | None = Field(
        None, description="Local data folder (GLUE layout, emotion JSONL, ...); builtin:sample is the shipped sample."
    )
    max_seq_length: int | None = Field(
        None, gt=0,
        description="Truncate inputs to this many tokens (QA: window length). Default: the task's own "
        "(128; 384 for qa/*; 256 for superglue/boolq, multirc, record).",
    )
    max_train_samples: int | None = Field(None, gt=0, description="Use at most this many training examples.")
    max_eval_samples: int | None = Field(None, gt=0, description="Use at most this many evaluation examples.")
    k_shot: int | None = Field(
        None, gt=0,
        description="Train on K examples per class (seeded) for few-shot runs (classification tasks only).",
    )


class TrainingSettings(Section):
    num_train_epochs: float = Field(3.0, gt=0, description="Epochs (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Total optimisation steps; -1 means use num_train_epochs.")
    per_device_train_batch_size: int = Field(16, gt=0, description="Training batch size per device.")
    per_device_eval_batch_size: int = Field(64, gt=0, description="Evaluation batch size per device.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Accumulate gradients over this many batches.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate (AdamW; 5e-5 as in TrainingArguments).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not on biases and norms).")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Share of steps for linear warmup.")
    lr_scheduler_type: Literal[
        "linear", "cosine", "constant", "constant_with_warmup", "polynomial", "cosine_with_restarts"
    ] = Field("linear", description="Learning-rate schedule after warmup.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables).")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps (default: each epoch end).")
    save_steps: int | None = Field(None, gt=0, description="Checkpoint every N steps for --resume.")
    early_stopping_patience: int | None = Field(None, gt=0, description="Stop after N evaluations without improvement.")
    metric_for_best_model: str | None = Field(None, description="Metric that picks the best checkpoint (default: the task's first).")
    logging_steps: int = Field(10, gt=0, description="Log the loss every N steps.")


class CommandSettings(BaseModel):
    """A command's settings: its fields are :class:`Section` groups."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# --------------------------------------------------------------------------------------------
# field map (flag names <-> dotted keys)


def _section_fields(cls: type[CommandSettings]) -> Iterable[tuple[str, str, Any]]:
    for group_name, group_field in cls.model_fields.items():
        group_cls = group_field.annotation
        if not (isinstance(group_cls, type) and issubclass(group_cls, BaseModel)):
            continue
        for name, info in group_cls.model_fields.items():
            yield group_name, name, info


def flag_name(field_name: str, info: Any) -> str:
    extra = info.json_schema_extra or {}
    if isinstance(extra, dict) and extra.get("flag"):
        return str(extra["flag"])
    return "--" + field_name.replace("_", "-")


def field_map(cls: type[CommandSettings]) -> dict[str, tuple[str, str, Any]]:
    """Bare field name -> (group, field, FieldInfo). Field names are unique per command."""
    out: dict[str, tuple[str, str, Any]] = {}
    for group, name, info in _section_fields(cls):
        if name in out:
            raise RuntimeError(f"settings field {name!r} appears in groups {out[name][0]!r} and {group!r}")
        out[name] = (group, name, info)
    return out


def resolve_key(cls: type[CommandSettings], key: str) -> str:
    """Turn a user key (``learning_rate``, ``learning-rate`` or ``training.learning_rate``) into a dotted key."""
    key = key.strip()
    if "." in key:
        return key
    fm = field_map(cls)
    bare = key.replace("-", "_")
    if bare in fm:
        group, name, _ = fm[bare]
        return f"{group}.{name}"
    if bare in cls.model_fields:
        return bare
    raise UserError(
        f"unknown setting {key!r}",
        hint=f"valid names: {', '.join(sorted(fm))}",
    )


def is_list_field(info: Any) -> bool:
    ann = info.annotation
    for cand in (ann, *get_args(ann)):
        if get_origin(cand) in (list, tuple) or cand in (list, tuple):
            return True
    return False


# --------------------------------------------------------------------------------------------
# presets


def presets_dirs() -> list[Path]:
    """Preset folders: the copy inside an installed wheel, and ``presets/`` of a source checkout."""
    dirs: list[Path] = []
    try:
        pkg = resources.files("mergekit_lab") / "presets"
        if pkg.is_dir():
            dirs.append(Path(str(pkg)))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover
        pass
    checkout = Path(__file__).resolve().parent.parent / "presets"
    if checkout.is_dir() and checkout not in dirs:
        dirs.append(checkout)
    return dirs


def list_presets() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in presets_dirs():
        for p in sorted(d.glob("*.yaml")):
            found.setdefault(p.stem, p)
    return found


def read_yaml(path: Path, what: str = "config") -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} file {str(path)!r} does not exist", hint="check the path") from None
    except OSError as e:
        raise UserError(f"cannot read {what} file {str(path)!r}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"malformed YAML in {what} file {str(path)!r}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what} file {str(path)!r} must hold a mapping of settings, not a {type(data).__name__}")
    return data


def load_preset(name: str, command: str | None = None) -> dict[str, Any]:
    presets = list_presets()
    path = Path(name) if name.endswith((".yaml", ".yml")) else presets.get(name)
    if path is None:
        raise UserError(f"unknown preset {name!r}", hint=f"available: {', '.join(sorted(presets)) or 'none'}")
    data = read_yaml(path, "preset")
    preset_cmd = data.pop("command", None)
    data.pop("description", None)
    if command and preset_cmd and preset_cmd != command:
        raise UserError(f"preset {name!r} is for `mklab {preset_cmd}`, not `mklab {command}`",
                        hint=f"run `mklab {preset_cmd} --preset {name}`")
    return data


def preset_description(path: Path) -> tuple[str, str]:
    data = read_yaml(path, "preset")
    return str(data.get("command", "?")), str(data.get("description", "")).strip().splitlines()[0] if data.get(
        "description"
    ) else ""


# --------------------------------------------------------------------------------------------
# merging and validation

META_KEYS = ("sweep",)  # keys in config files handled outside the settings model


def deep_merge(base: dict[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in other.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def parse_assignment(text: str, what: str = "--set") -> tuple[str, Any]:
    if "=" not in text:
        raise UserError(f"{what} {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise UserError(f"{what} {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _check_keys(cls: type[CommandSettings], data: Mapping[str, Any], source: str) -> None:
    """Name the first unknown key and its source (file, preset, --set)."""
    for group, value in data.items():
        if group in META_KEYS:
            continue
        if group not in cls.model_fields:
            fm = field_map(cls)
            hint = ""
            if group in fm:
                hint = f"put it under `{fm[group][0]}:` (as {fm[group][0]}.{group})"
            else:
                hint = f"valid groups: {', '.join(cls.model_fields)}"
            raise UserError(f"unknown config key {group!r} in {source}", hint=hint)
        group_cls = cls.model_fields[group].annotation
        if isinstance(value, Mapping) and isinstance(group_cls, type) and issubclass(group_cls, BaseModel):
            for k in value:
                if k not in group_cls.model_fields:
                    raise UserError(
                        f"unknown config key '{group}.{k}' in {source}",
                        hint=f"valid keys of {group}: {', '.join(group_cls.model_fields)}",
                    )


_TEMPLATE_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def apply_templates(data: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(data, dict):
        return {k: apply_templates(v, values) for k, v in data.items()}
    if isinstance(data, list):
        return [apply_templates(v, values) for v in data]
    if isinstance(data, str):
        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in values:
                raise UserError(f"template placeholder {{{name}}} in {data!r} has no value",
                                hint=f"pass --template {name}=VALUE")
            return str(values[name])

        new = _TEMPLATE_RE.sub(sub, data)
        if new != data and _TEMPLATE_RE.fullmatch(data):
            # a whole-value placeholder keeps the template's type (e.g. seed: "{seed}" -> 1)
            return values[_TEMPLATE_RE.fullmatch(data).group(1)]  # type: ignore[union-attr]
        return new
    return data


def _format_validation_error(err: ValidationError, sources: Mapping[str, str]) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    src = sources.get(loc)
    where = f" (from {src})" if src else ""
    if e["type"] == "missing":
        return f"missing required setting {loc}{where}"
    given = e.get("input")
    given_s = f"={given!r}" if given is not None and not isinstance(given, dict) else ""
    return f"invalid setting {loc}{given_s}{where}: {e['msg']}"


def _record_sources(data: Mapping[str, Any], source: str, sources: dict[str, str], prefix: str = "") -> None:
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            _record_sources(v, source, sources, key + ".")
        else:
            sources[key] = source


class Loaded(BaseModel):
    """The raw, merged config before validation, kept for sweeps and --print-config."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    raw: dict[str, Any]
    sources: dict[str, str]
    sweep: dict[str, list[Any]] = {}


def merge_sources(
    cls: type[CommandSettings],
    *,
    command: str | None = None,
    preset: str | None = None,
    configs: Iterable[str | Path] = (),
    sets: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> Loaded:
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    sweep: dict[str, list[Any]] = {}

    def take(data: dict[str, Any], source: str) -> None:
        nonlocal raw
        data = dict(data)
        sw = data.pop("sweep", None)
        if sw is not None:
            if not isinstance(sw, Mapping):
                raise UserError(f"`sweep:` in {source} must map setting names to lists of values")
            for k, vals in sw.items():
                sweep[str(k)] = list(vals) if isinstance(vals, (list, tuple)) else [vals]
        _check_keys(cls, data, source)
        _record_sources(data, source, sources)
        raw = deep_merge(raw, data)

    if preset:
        take(load_preset(preset, command), f"preset {preset!r}")
    for cfg in configs:
        take(read_yaml(Path(cfg)), f"config file {str(cfg)!r}")
    for s in sets:
        key, value = parse_assignment(s)
        dotted = resolve_key(cls, key)
        d: dict[str, Any] = {}
        set_dotted(d, dotted, value)
        take(d, f"--set {s}")
    if flags:
        fm = field_map(cls)
        d = {}
        for name, value in flags.items():
            group, field, info = fm[name]
            set_dotted(d, f"{group}.{field}", value)
            sources[f"{group}.{field}"] = flag_name(field, info)
        raw = deep_merge(raw, d)
    return Loaded(raw=raw, sources=sources, sweep=sweep)


def validate(cls: type[CommandSettings], raw: Mapping[str, Any], sources: Mapping[str, str] | None = None):
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_validation_error(err, sources or {})) from None


def load_settings(
    cls: type[CommandSettings],
    *,
    command: str | None = None,
    preset: str | None = None,
    configs: Iterable[str | Path] = (),
    sets: Iterable[str] = (),
    templates: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
):
    """Resolve every source into one validated settings object (see module docstring)."""
    loaded = merge_sources(cls, command=command, preset=preset, configs=configs, sets=sets, flags=flags)
    values = dict(parse_assignment(t, "--template") for t in templates)
    raw = apply_templates(loaded.raw, values)
    return validate(cls, raw, loaded.sources)


def to_yaml(settings: BaseModel) -> str:
    return yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False)
