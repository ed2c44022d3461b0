"""Parameter budgets: exact counts and ``--match-pt-length``.

DePT with prompt length ``m`` and rank ``r`` on a model with hidden size ``d`` and maximum
input length ``s`` trains ``m*d + r*(s + d)`` prompt parameters; PT of length ``L`` trains
``L*d``. :func:`match_pt_length` lists every exact ``(m, r)`` with equal budgets.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergekit_lab.errors import UserError

# The paper's choice at L=100 is m=60 for both s=256 (r=30) and s=512 (r=24): keep ~60% of the
# budget in the prompt. Used to pick one option when the user does not fix m.
PAPER_PROMPT_FRACTION = 0.6


def pt_prompt_params(length: int, d: int) -> int:
    """Trainable prompt parameters of vanilla prompt tuning with ``length`` virtual tokens."""
    return int(length) * int(d)


def dept_prompt_params(m: int, r: int, d: int, s: int) -> int:
    """Trainable parameters of DePT: soft prompt ``m x d`` plus ``A (s x r)`` and ``B (r x d)``."""
    return int(m) * int(d) + int(r) * (int(s) + int(d))


@dataclass(frozen=True)
class BudgetOption:
    m: int
    r: int
    params: int


@dataclass(frozen=True)
class BudgetMatch:
    """Result of :func:`match_pt_length`: the chosen option and every exact option."""

    length: int
    d: int
    s: int
    chosen: BudgetOption
    options: tuple[BudgetOption, ...]

    def describe(self) -> str:
        others = ", ".join(f"(m={o.m}, r={o.r})" for o in self.options if o != self.chosen)
        return (
            f"PT-{self.length} budget {self.length * self.d} = m*d + r*(s+d) with d={self.d}, s={self.s}: "
            f"using m={self.chosen.m}, r={self.chosen.r}; other exact options: {others or 'none'}"
        )


def exact_options(length: int, d: int, s: int) -> list[BudgetOption]:
    """All ``(m, r)`` with ``m >= 1``, ``r >= 1`` and ``m*d + r*(s+d) == length*d``, by rank."""
    if length < 1 or d < 1 or s < 1:
        raise UserError(f"match-pt-length needs L, d, s >= 1 (got L={length}, d={d}, s={s})")
    budget = length * d
    out = []
    r = 1
    while budget - r * (s + d) >= d:
        rest = budget - r * (s + d)
        if rest % d == 0:
            out.append(BudgetOption(m=rest // d, r=r, params=budget))
        r += 1
    return out


def match_pt_length(length: int, d: int, s: int, *, m: int | None = None) -> BudgetMatch:
    """Choose DePT's ``(m, r)`` with exactly the trainable budget of PT of length ``length``.

    With ``m`` given, the option with that prompt length is used (error if none is exact);
    otherwise the option whose ``m`` is closest to 60% of ``length`` (the paper's choice)."""
    options = exact_options(length, d, s)
    if not options:
        raise UserError(
            f"no exact DePT option for --match-pt-length {length} with d={d}, s={s}: "
            f"r*(s+d) must be a multiple of d={d}",
            hint="change --max-seq-length (s) or --prefix-length, or set --prefix-length and --r yourself",
        )
    if m is not None:
        hit = [o for o in options if o.m == m]
        if not hit:
            listed = ", ".join(f"(m={o.m}, r={o.r})" for o in options)
            raise UserError(
                f"--prefix-length {m} has no exact DePT rank for --match-pt-length {length} (d={d}, s={s})",
                hint=f"exact options: {listed}",
            )
        chosen = hit[0]
    else:
        target = PAPER_PROMPT_FRACTION * length
        chosen = min(options, key=lambda o: (abs(o.m - target), -o.m))
    return BudgetMatch(length=length, d=d, s=s, chosen=chosen, options=tuple(options))
