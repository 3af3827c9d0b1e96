"""Countdown: a small planning task with an exact checker.

A question lists ``n`` input numbers and a target, ``"a,b,c,target"`` (``n`` = 3, 4 or 5 is the
difficulty knob). A **plan** is ``n - 1`` equations separated by commas, ``"6-3=3,9*3=27"`` for
``"6,3,9,27"``: each equation combines two available numbers (an input, or the result of an
earlier equation, each used once) with ``+ - * /``, every equation is exactly true, and the last
result is the target; every input is then used exactly once. The **answer** is one arithmetic
expression over the input multiset that evaluates to the target, ``"9*(6-3)"``
(:func:`plan_to_answer` derives it from a plan).

Checkers never ``eval``: equations are matched by a regular expression and checked with
:class:`fractions.Fraction` arithmetic, answers are parsed with :mod:`ast` and evaluated by a
tiny tree walker over ``+ - * /`` and integer literals.

The generator is seeded (:func:`generate_problems`): numbers are drawn in
``[low, high]``, pairs and operators at random; intermediate results must be integers in
``[1, max_value]`` (so division is exact and nothing is negative); each equation is written with
the larger operand first. A held-out set comes from a disjoint seed, and training sets exclude
held-out questions by content (:func:`split_problems`).
"""

from __future__ import annotations

import ast
import dataclasses
import random
import re
from collections import Counter
from collections.abc import Iterable
from fractions import Fraction

OPS = "+-*/"
DIFFICULTIES = (3, 4, 5)
# Defaults of the generator: inputs 1..10, every intermediate result and the target in 1..99.
LOW, HIGH, MAX_VALUE = 1, 10, 99
MAX_TEXT = 200  # longest plan / answer the checkers parse
MAX_FAILED_DRAWS = 20000  # consecutive useless draws before the generator gives up

_NUMBER = r"(?:0|[1-9]\d*)"
_EQUATION_RE = re.compile(rf"(-?{_NUMBER})([+\-*/])(-?{_NUMBER})=(-?{_NUMBER})")
_QUESTION_RE = re.compile(rf"{_NUMBER}(?:,{_NUMBER})+")
_ANSWER_CHARS_RE = re.compile(r"[0-9+\-*/() ]+")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One Countdown problem: ``numbers`` (the ``n`` inputs, in question order), ``target``, a gold
    ``plan`` and the gold ``answer`` expression derived from it."""

    numbers: tuple[int, ...]
    target: int
    plan: str
    answer: str

    @property
    def n(self) -> int:
        return len(self.numbers)

    @property
    def question(self) -> str:
        """``"a,b,c,target"``."""
        return ",".join(str(v) for v in (*self.numbers, self.target))

    @property
    def key(self) -> tuple[tuple[int, ...], int]:
        """The question up to the order of its inputs: ``(sorted numbers, target)``."""
        return tuple(sorted(self.numbers)), self.target

    def to_dict(self) -> dict:
        return {"question": self.question, "plan": self.plan, "answer": self.answer}


# --------------------------------------------------------------------------- parsing
def parse_question(question: str) -> tuple[list[int], int]:
    """``"a,b,c,t"`` -> ``([a, b, c], t)``. ``ValueError`` naming the question when it is not
    2-or-more non-negative integers separated by commas (the last is the target)."""
    if not isinstance(question, str):
        raise TypeError(f"countdown: question must be a str, got {type(question).__name__}")
    text = "".join(question.split())
    if not text:
        raise ValueError("countdown: empty question (expected 'a,b,c,target')")
    if not _QUESTION_RE.fullmatch(text):
        raise ValueError(
            f"countdown: question {question!r} is not comma-separated non-negative integers "
            "'a,b,...,target' (at least one input and the target)"
        )
    values = [int(v) for v in text.split(",")]
    return values[:-1], values[-1]


def parse_plan(plan: str) -> list[tuple[int, str, int, int]] | None:
    """``"6-3=3,9*3=27"`` -> ``[(6, "-", 3, 3), (9, "*", 3, 27)]``; None when the text is not a
    comma-separated list of ``x op y = r`` equations (whitespace is ignored)."""
    if not isinstance(plan, str) or len(plan) > MAX_TEXT:
        return None
    text = "".join(plan.split())
    if not text:
        return None
    out = []
    for part in text.split(","):
        m = _EQUATION_RE.fullmatch(part)
        if m is None:
            return None
        out.append((int(m[1]), m[2], int(m[3]), int(m[4])))
    return out


def apply_op(x: Fraction | int, op: str, y: Fraction | int) -> Fraction | None:
    """Exact ``x op y`` (None for a division by zero)."""
    x, y = Fraction(x), Fraction(y)
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    if op == "/":
        return None if y == 0 else x / y
    raise ValueError(f"countdown: unknown operator {op!r}")


# --------------------------------------------------------------------------- checkers
def check_plan(question: str, plan: str) -> bool:
    """True when ``plan`` solves ``question``: exactly ``n - 1`` equations, each exactly true and
    using two numbers available at that point (inputs and earlier results, each once), the last
    result equal to the target. Garbage or empty plans are False; a malformed question raises
    ``ValueError``."""
    numbers, target = parse_question(question)
    equations = parse_plan(plan)
    if equations is None or len(equations) != len(numbers) - 1:
        return False
    pool = Counter(numbers)
    for x, op, y, r in equations:
        pool[x] -= 1
        pool[y] -= 1
        if pool[x] < 0 or pool[y] < 0:
            return False
        if apply_op(x, op, y) != r:
            return False
        pool[r] += 1
    return equations[-1][3] == target


def evaluate_expression(text: str) -> tuple[Fraction, list[int]] | None:
    """Exact value and integer literals of an arithmetic expression over ``+ - * /``, integer
    literals and parentheses (no unary operators, no other syntax); None when it is not one or
    divides by zero."""
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
        return None
    if not _ANSWER_CHARS_RE.fullmatch(text):
        return None
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return None
    ops = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
    literals: list[int] = []

    def walk(node) -> Fraction | None:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            left, right = walk(node.left), walk(node.right)
            if left is None or right is None:
                return None
            return apply_op(left, ops[type(node.op)], right)
        return None

    value = walk(tree.body)
    return None if value is None else (value, literals)


def check_answer(question: str, answer: str) -> bool:
    """True when ``answer`` is an expression over exactly the question's input multiset whose exact
    value is the target. Garbage or empty answers are False; a malformed question raises
    ``ValueError``."""
    numbers, target = parse_question(question)
    result = evaluate_expression(answer)
    if result is None:
        return False
    value, literals = result
    return Counter(literals) == Counter(numbers) and value == target


# --------------------------------------------------------------------------- plan -> answer
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


def _operand(expr: str, prec: int, parent: str, right: bool) -> str:
    p = _PRECEDENCE[parent]
    if prec < p or (right and prec == p and parent in "-/"):
        return f"({expr})"
    return expr


def plan_to_answer(plan: str) -> str:
    """The single expression a plan computes: ``"6-3=3,9*3=27"`` -> ``"9*(6-3)"``.

    Each operand that equals an earlier, not yet used result stands for that result's
    expression (the most recent one first), any other operand is a literal; parentheses only
    where precedence needs them. ``ValueError`` when the plan does not parse."""
    equations = parse_plan(plan)
    if equations is None:
        raise ValueError(f"plan_to_answer: {plan!r} is not a list of 'x op y = r' equations")
    results: dict[int, list[tuple[str, int]]] = {}
    expr, prec = "", _ATOM
    for x, op, y, r in equations:
        parts = []
        for value in (x, y):
            stack = results.get(value)
            parts.append(stack.pop() if stack else (str(value), _ATOM))
        (ex, px), (ey, py) = parts
        expr = f"{_operand(ex, px, op, False)}{op}{_operand(ey, py, op, True)}"
        prec = _PRECEDENCE[op]
        results.setdefault(r, []).append((expr, prec))
    return expr


# --------------------------------------------------------------------------- generator
def _random_problem(rng: random.Random, n: int, low: int, high: int, max_value: int) -> Problem | None:
    numbers = [rng.randint(low, high) for _ in range(n)]
    pool = list(numbers)
    equations = []
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        x, y = max(pool[i], pool[j]), min(pool[i], pool[j])
        candidates = [op for op in OPS if _valid(x, op, y, max_value)]
        if not candidates:
            return None
        op = rng.choice(candidates)
        r = int(apply_op(x, op, y))
        equations.append(f"{x}{op}{y}={r}")
        pool = [v for k, v in enumerate(pool) if k not in (i, j)] + [r]
    plan = ",".join(equations)
    return Problem(tuple(numbers), pool[0], plan, plan_to_answer(plan))


def _valid(x: int, op: str, y: int, max_value: int) -> bool:
    r = apply_op(x, op, y)
    return r is not None and r.denominator == 1 and 1 <= r <= max_value


def generate_problems(
    n: int,
    count: int,
    seed: int,
    *,
    low: int = LOW,
    high: int = HIGH,
    max_value: int = MAX_VALUE,
    exclude: Iterable = (),
    distinct: str = "question",
) -> list[Problem]:
    """``count`` distinct Countdown problems with ``n`` inputs, a function of all arguments.

    Inputs are uniform in ``[low, high]``; each step picks two available numbers and an operator
    (uniformly among those whose result is an integer in ``[1, max_value]``); a draw with no valid
    operator is redrawn. ``distinct="question"``: no two problems have the same question text;
    ``"key"``: no two have the same :attr:`Problem.key` (inputs as a multiset, and target).
    ``exclude``: :attr:`Problem.key` values never drawn (a held-out set's keys, so no permutation
    of a held-out question is drawn either). ``ValueError`` when the space cannot supply ``count``
    problems."""
    if n not in DIFFICULTIES:
        raise ValueError(f"generate_problems: n must be one of {DIFFICULTIES}, got {n!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"generate_problems: count must be an int >= 0, got {count!r}")
    if not 0 <= low <= high or max_value < 1:
        raise ValueError(
            f"generate_problems: need 0 <= low <= high and max_value >= 1, got {low}, {high}, {max_value}"
        )
    if distinct not in ("question", "key"):
        raise ValueError(f"generate_problems: distinct must be 'question' or 'key', got {distinct!r}")
    rng = random.Random(f"countdown-n{n}-seed{seed}-{low}-{high}-{max_value}")
    excluded = set(exclude)
    seen: set = set()
    out: list[Problem] = []
    failures = 0
    while len(out) < count:
        problem = _random_problem(rng, n, low, high, max_value)
        mark = None if problem is None else (problem.question if distinct == "question" else problem.key)
        if problem is None or mark in seen or problem.key in excluded:
            failures += 1  # consecutive draws that added nothing: the space is (nearly) exhausted
            if failures > MAX_FAILED_DRAWS:
                raise ValueError(
                    f"generate_problems: found only {len(out)} of {count} distinct problems "
                    f"(n={n}, inputs {low}..{high}, results <= {max_value}); ask for fewer"
                )
            continue
        seen.add(mark)
        out.append(problem)
        failures = 0
    return out


def split_problems(
    n: int,
    train_count: int,
    heldout_count: int,
    *,
    train_seed: int,
    heldout_seed: int,
    valid_count: int = 0,
    valid_seed: int | None = None,
    **kwargs,
):
    """``(train, heldout)``, or ``(train, heldout, valid)`` with ``valid_seed``: held-out problems
    from ``heldout_seed`` (distinct keys); validation problems from ``valid_seed`` (distinct keys,
    none a held-out key); training problems from ``train_seed`` with every held-out and validation
    question excluded by content, permutations of its inputs included (no training problem has a
    held-out or validation :attr:`Problem.key`)."""
    seeds = [train_seed, heldout_seed] + ([] if valid_seed is None else [valid_seed])
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"split_problems: the seeds must differ, got {seeds}")
    heldout = generate_problems(n, heldout_count, heldout_seed, distinct="key", **kwargs)
    excluded = {p.key for p in heldout}
    valid = []
    if valid_seed is not None:
        valid = generate_problems(n, valid_count, valid_seed, distinct="key", exclude=excluded, **kwargs)
        excluded |= {p.key for p in valid}
    train = generate_problems(n, train_count, train_seed, exclude=excluded, **kwargs)
    return (train, heldout) if valid_seed is None else (train, heldout, valid)


__all__ = [
    "DIFFICULTIES",
    "Problem",
    "apply_op",
    "check_answer",
    "check_plan",
    "evaluate_expression",
    "generate_problems",
    "parse_plan",
    "parse_question",
    "plan_to_answer",
    "split_problems",
]
