"""The embedded task: procedurally generated multi-step arithmetic word problems.

A problem is a short story of 2-4 operations on one quantity; its reference solution writes
one line ``a op b = c`` per operation and ends in ``\\boxed{answer}``. Difficulty combines the
number of steps with the operand size (levels 1..6). Train and held-out splits are decided by
a hash of the problem text, so they never overlap whatever the seeds.

For the supervised warm start, :func:`sft_solution` can also write a solution with one of two
*flawed habits* (documented in README): stopping one step early, and reading "loses" as an
addition. They mimic what makes preference learning useful on real LLMs: the base model can
solve a problem it usually fails, so sampling mines (correct, flawed) pairs to learn from.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from alignlab.records import Problem

NAMES = ["Ava", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena", "Max", "Nia",
         "Omar", "Pia", "Raj", "Sara", "Tom", "Uma", "Vic", "Wen", "Yara", "Zed"]
ITEMS = ["apples", "marbles", "stickers", "coins", "books", "cards", "pencils", "shells", "stamps", "cookies",
         "beads", "rocks"]
ADD = ["{n} buys {x} more {item}.", "{n} finds {x} {item}.", "A friend gives {n} {x} {item}.", "{n} wins {x} {item}."]
SUB = ["{n} gives away {x} {item}.", "{n} loses {x} {item}.", "{n} sells {x} {item}.", "{n} uses {x} {item}."]
MUL = {2: "{n} doubles the {item}.", 3: "{n} triples the {item}."}
LEVELS = {1: (2, 9), 2: (2, 30), 3: (3, 9), 4: (3, 30), 5: (4, 9), 6: (4, 30)}  # level -> (steps, max operand)


@dataclass
class Step:
    op: str  # "+", "-", "*"
    x: int
    sentence: str


@dataclass
class ArithProblem:
    name: str
    item: str
    start: int
    steps: list[Step]
    level: int

    @property
    def text(self) -> str:
        body = " ".join(s.sentence for s in self.steps)
        return (f"{self.name} has {self.start} {self.item}. {body} "
                f"How many {self.item} does {self.name} have now?")

    def values(self) -> list[int]:
        vals, v = [], self.start
        for s in self.steps:
            v = apply(v, s.op, s.x)
            vals.append(v)
        return vals

    @property
    def answer(self) -> int:
        return self.values()[-1]


def apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _problem_id(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def split_of(text: str, heldout_fraction: float = 0.1) -> str:
    """Deterministic split from the text's hash, so train and held-out never overlap."""
    h = int(hashlib.sha1(("split:" + text).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "heldout" if h < heldout_fraction else "train"


def random_problem(rng: random.Random, level: int) -> ArithProblem:
    steps_n, hi = LEVELS[level]
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(2, hi)
    v, steps = start, []
    for _ in range(steps_n):
        kind = rng.random()
        if kind < 0.15 and v <= 60:
            k = rng.choice([2, 3])
            steps.append(Step("*", k, MUL[k].format(n=name, item=item)))
        elif kind < 0.55 and v >= 2:
            x = rng.randint(1, min(v, hi))
            steps.append(Step("-", x, rng.choice(SUB).format(n=name, x=x, item=item)))
        else:
            x = rng.randint(1, hi)
            steps.append(Step("+", x, rng.choice(ADD).format(n=name, x=x, item=item)))
        v = apply(v, steps[-1].op, steps[-1].x)
    return ArithProblem(name, item, start, steps, level)


CUES = {"loses": ("-", "+"), "uses": ("-", "+"), "triples": ("*", "*2")}  # cue word -> (op, flawed op)


def cue_of(step: Step) -> str | None:
    """The cue word of a step that a flawed habit misreads, if any."""
    for cue in CUES:
        if f" {cue} " in step.sentence:
            return cue
    return None


def solution(p: ArithProblem, skip_last: bool = False, slip_loses: bool = False,
             slips: tuple[bool, ...] | None = None) -> str:
    """Step-by-step solution; the flags switch on the documented flawed habits.

    ``slips[i]`` misreads step i's cue word ("loses"/"uses" as an addition, "triples" as doubling);
    ``slip_loses`` slips every "loses" step; ``skip_last`` stops one step early.
    """
    lines, v = [], p.start
    steps = p.steps[:-1] if skip_last else p.steps
    for i, s in enumerate(steps):
        op, x = s.op, s.x
        slip = (slips[i] if slips is not None else False) or (slip_loses and cue_of(s) == "loses")
        if slip and cue_of(s) is not None:
            op, x = ("+", x) if s.op == "-" else ("*", 2)
        new = apply(v, op, x)
        lines.append(f"{v} {op} {x} = {new}")
        v = new
    lines.append(f"The answer is \\boxed{{{v}}}.")
    return "\n".join(lines)


def to_problem(p: ArithProblem) -> Problem:
    return Problem(id=_problem_id(p.text), prompt=p.text, answer=str(p.answer), difficulty=p.level, source="arith")


def generate(n: int, split: str, seed: int, levels: tuple[int, ...] = (1, 2, 3, 4, 5, 6),
             heldout_fraction: float = 0.1) -> list[ArithProblem]:
    """``n`` distinct problems of ``split`` ("train" | "heldout"), balanced over ``levels``."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"arith:{split}:{seed}")
    out: list[ArithProblem] = []
    seen: set[str] = set()
    i = 0
    while len(out) < n:
        p = random_problem(rng, levels[i % len(levels)])
        i += 1
        t = p.text
        if t in seen or split_of(t, heldout_fraction) != split:
            continue
        seen.add(t)
        out.append(p)
    return out


class ArithDataset:
    """``data=arith``: training prompts per round and the held-out evaluation set."""

    def __init__(self, train_prompts: int = 256, eval_problems: int = 600, seed: int = 0,
                 levels: list[int] | None = None, heldout_fraction: float = 0.1) -> None:
        if train_prompts < 1:
            raise ValueError(f"train_prompts must be >= 1, got {train_prompts}")
        if eval_problems < 1:
            raise ValueError(f"eval_problems must be >= 1, got {eval_problems}")
        bad = [lv for lv in (levels or []) if lv not in LEVELS]
        if bad:
            raise ValueError(f"levels must be within {sorted(LEVELS)}, got {bad}")
        self.train_prompts = train_prompts
        self.eval_problems = eval_problems
        self.seed = seed
        self.levels = tuple(levels or LEVELS)
        self.heldout_fraction = heldout_fraction

    def train(self, round_index: int) -> list[Problem]:
        """A fresh prompt shard per round (as DPO-R1 uses a new prompt split per iteration)."""
        ps = generate(self.train_prompts, "train", seed=self.seed * 1000 + round_index + 1, levels=self.levels,
                      heldout_fraction=self.heldout_fraction)
        return [to_problem(p) for p in ps]

    def check_heldout(self) -> None:
        """Nothing to check: the held-out split is generated."""

    def heldout(self) -> list[Problem]:
        ps = generate(self.eval_problems, "heldout", seed=12345, levels=self.levels,
                      heldout_fraction=self.heldout_fraction)
        return [to_problem(p) for p in ps]
