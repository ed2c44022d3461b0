"""Neuron mappings: which teacher locations are aligned with which student locations.

A location is a slice of one transformer block's *output* (the residual stream after the block):
``$L:<layers>$H:<heads>$[<d0>:<d1>]`` where ``<layers>`` and ``<heads>`` are an index ``6`` or a
half-open range ``[0:12]``, and ``[d0:d1]`` are dimensions inside each head
(head size = hidden size / number of heads). ``$L:6$H:[0:12]$[0:64]`` is all of block 6's
output in BERT-base. ``$H`` and the dimension part may be omitted (= all heads, all dims).
Layers are 0-based block indices, in both models, and the SAME block's output is read (on the
source) and written (on the base): the original read ``hidden_states[L]`` (the output of block
L-1) but wrote into block L.

The file format is the original ``.nm`` JSON::

    {"interchange_variable_mappings": [
        {"teacher_variable_names": ["$L:6$H:[0:12]$[0:64]"],
         "student_variable_names": ["$L:3$H:[0:12]$[0:64]"]}]}

Every entry is one aligned pair; each training step samples one pair uniformly (the original
sampled one of a pair's variable names; ours intervenes on all names of the pair at once, which
is the same for every published ``.nm`` file since they list one name per side). A name whose
layer part is a range (``$L:[0:4]``) intervenes on every block of the range simultaneously.

Built-ins (for a teacher with T layers and a student with S layers; the originals are for
T=12, S=6 or 3):

* ``single_middle``: block T//2 <-> block S//2 (12/6: 6 <-> 3, the README run's mapping).
* ``late``: block T-2 <-> block S-2 (the original ``single_middle_late.nm``: 10 <-> 1 for S=3).
* ``multilayer``: the teacher's blocks cut into S consecutive groups, group i <-> student block
  i, one pair per step (the original ``multiple_single_multilayer_layer_6.nm``:
  [0:2]<->0, [2:4]<->1, ... for 12/6).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_lab.errors import UserError

BUILTIN_MAPPINGS = ("single_middle", "late", "multilayer")

_PART = r"(\d+|\[\s*\d+\s*:\s*\d+\s*\])"
_NAME_RE = re.compile(rf"^\$L:{_PART}(?:\$H:{_PART})?(?:\$\[\s*(\d+)\s*:\s*(\d+)\s*\])?$")


def _range(part: str | None) -> tuple[int, int] | None:
    if part is None:
        return None
    part = part.strip()
    if part.startswith("["):
        a, b = part.strip("[]").split(":")
        return int(a), int(b)
    return int(part), int(part) + 1


@dataclass(frozen=True)
class Variable:
    """One location: blocks [l0, l1), heads [h0, h1) (None = all), dims [d0, d1) in each head (None = all)."""

    layers: tuple[int, int]
    heads: tuple[int, int] | None = None
    dims: tuple[int, int] | None = None
    name: str = ""

    @classmethod
    def parse(cls, name: str) -> Variable:
        m = _NAME_RE.match(name.strip().replace(" ", ""))
        if not m:
            raise UserError(
                f"cannot parse neuron variable {name!r}",
                hint="expected e.g. $L:6$H:[0:12]$[0:64] (layer, heads, dims per head)",
            )
        dims = (int(m.group(3)), int(m.group(4))) if m.group(3) is not None else None
        return cls(layers=_range(m.group(1)), heads=_range(m.group(2)), dims=dims, name=name)

    def resolve(self, n_layers: int, n_heads: int, hidden: int, who: str) -> dict[int, torch.Tensor]:
        """Map block index -> hidden-dim indices; UserError when out of range for this model."""
        head_dim = hidden // n_heads
        l0, l1 = self.layers
        h0, h1 = self.heads if self.heads is not None else (0, n_heads)
        d0, d1 = self.dims if self.dims is not None else (0, head_dim)
        where = f"{who} variable {self.name or self}"
        if not (0 <= l0 < l1 <= n_layers):
            raise UserError(f"{where}: layer range [{l0}:{l1}) is outside the {who}'s {n_layers} layers (0..{n_layers - 1})")
        if not (0 <= h0 < h1 <= n_heads):
            raise UserError(f"{where}: head range [{h0}:{h1}) is outside the {who}'s {n_heads} heads (0..{n_heads - 1})")
        if not (0 <= d0 < d1 <= head_dim):
            raise UserError(f"{where}: dims [{d0}:{d1}) exceed the {who}'s head size {head_dim}")
        idx = torch.cat([torch.arange(h * head_dim + d0, h * head_dim + d1) for h in range(h0, h1)])
        return {layer: idx for layer in range(l0, l1)}


@dataclass
class MappingPair:
    teacher: list[Variable]
    student: list[Variable]


@dataclass
class ResolvedPair:
    """A pair with concrete per-block index sets for both models."""

    teacher: dict[int, torch.Tensor]
    student: dict[int, torch.Tensor]
    description: str = ""


@dataclass
class NeuronMapping:
    pairs: list[MappingPair]
    name: str = "custom"
    resolved: list[ResolvedPair] = field(default_factory=list)

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_dict(cls, obj: dict, name: str = "custom") -> NeuronMapping:
        if not isinstance(obj, dict) or "interchange_variable_mappings" not in obj:
            raise UserError(f"neuron mapping {name}: expected a JSON object with 'interchange_variable_mappings'")
        pairs = []
        for i, entry in enumerate(obj["interchange_variable_mappings"]):
            try:
                t = [Variable.parse(n) for n in entry["teacher_variable_names"]]
                s = [Variable.parse(n) for n in entry["student_variable_names"]]
            except (KeyError, TypeError) as exc:
                raise UserError(
                    f"neuron mapping {name}: entry {i} needs 'teacher_variable_names' and 'student_variable_names' lists"
                ) from exc
            if not t or not s:
                raise UserError(f"neuron mapping {name}: entry {i} has an empty side")
            pairs.append(MappingPair(t, s))
        if not pairs:
            raise UserError(f"neuron mapping {name} is empty")
        return cls(pairs=pairs, name=name)

    @classmethod
    def from_file(cls, path: str | Path) -> NeuronMapping:
        path = Path(path)
        try:
            obj = json.loads(path.read_text())
        except OSError as exc:
            raise UserError(f"cannot read neuron mapping {path}: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise UserError(f"neuron mapping {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(obj, name=str(path))

    @classmethod
    def builtin(cls, name: str, n_teacher: int, n_student: int) -> NeuronMapping:
        if name == "single_middle":
            pairs = [MappingPair([Variable((n_teacher // 2, n_teacher // 2 + 1))], [Variable((n_student // 2, n_student // 2 + 1))])]
        elif name == "late":
            t, s = max(n_teacher - 2, 0), max(n_student - 2, 0)
            pairs = [MappingPair([Variable((t, t + 1))], [Variable((s, s + 1))])]
        elif name == "multilayer":
            pairs = []
            for i in range(n_student):
                a = round(i * n_teacher / n_student)
                b = round((i + 1) * n_teacher / n_student)
                if b <= a:
                    b = a + 1
                pairs.append(MappingPair([Variable((a, b))], [Variable((i, i + 1))]))
        else:
            raise UserError(f"unknown neuron mapping {name!r}", hint=f"built-ins: {', '.join(BUILTIN_MAPPINGS)}, or a .nm/.json file")
        return cls(pairs=pairs, name=name)

    @classmethod
    def load(cls, spec: str, n_teacher: int, n_student: int) -> NeuronMapping:
        """A built-in name or a path to a .nm / .json file."""
        if spec in BUILTIN_MAPPINGS:
            return cls.builtin(spec, n_teacher, n_student)
        path = Path(spec)
        if not path.exists():
            raise UserError(f"neuron mapping {spec!r} is neither a built-in nor a file", hint=f"built-ins: {', '.join(BUILTIN_MAPPINGS)}")
        return cls.from_file(path)

    # ----------------------------------------------------------------- validation
    def resolve(self, teacher, student) -> NeuronMapping:
        """Check every variable against both models (UserError) and precompute index sets."""
        from mergekit_lab.distill.student import get_layers, hidden_size, num_heads

        shapes = {
            "teacher": (len(get_layers(teacher)), num_heads(teacher), hidden_size(teacher)),
            "student": (len(get_layers(student)), num_heads(student), hidden_size(student)),
        }
        self.resolved = []
        for i, pair in enumerate(self.pairs):
            sides = {}
            for who, variables in (("teacher", pair.teacher), ("student", pair.student)):
                merged: dict[int, torch.Tensor] = {}
                for v in variables:
                    try:
                        for layer, idx in v.resolve(*shapes[who], who=who).items():
                            merged[layer] = torch.unique(torch.cat([merged[layer], idx])) if layer in merged else idx
                    except UserError as exc:
                        raise UserError(f"neuron mapping {self.name}, entry {i}: {exc.message}", hint=exc.hint) from None
                sides[who] = merged
            desc = f"teacher blocks {sorted(sides['teacher'])} <-> student blocks {sorted(sides['student'])}"
            self.resolved.append(ResolvedPair(sides["teacher"], sides["student"], desc))
        return self

    def describe(self) -> list[str]:
        return [p.description for p in self.resolved]
