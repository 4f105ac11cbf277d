"""The subset of expr-lang that Argo Rollouts' successCondition / failureCondition use, evaluated without eval().

Argo evaluates a condition with ``result`` bound to the measurement (for Prometheus: a list of floats for a
vector, a float for a scalar) and the functions ``isNaN``, ``isInf``, ``asInt``, ``asFloat``, ``len`` and
``default``. This covers: numbers, ``true``/``false``, ``result``, indexing ``x[i]``, calls, unary ``!``/``not``/``-``,
``* / %``, ``+ -``, comparisons, ``&&``/``and`` and ``||``/``or`` (short-circuit, so ``len(result) > 0 &&
result[0] < 1`` is safe on an empty vector). Anything else is a :class:`ConditionError`, which Argo turns into an
Error measurement.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)"
    r"|(?P<str>\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*')"
    r"|(?P<name>[A-Za-z_]\w*)"
    r"|(?P<op>&&|\|\||==|!=|<=|>=|[<>!()\[\],+\-*/%]))"
)
_BINARY = {  # precedence, lowest first
    "||": 1,
    "or": 1,
    "&&": 2,
    "and": 2,
    "==": 3,
    "!=": 3,
    "<": 4,
    "<=": 4,
    ">": 4,
    ">=": 4,
    "+": 5,
    "-": 5,
    "*": 6,
    "/": 6,
    "%": 6,
}


class ConditionError(ValueError):
    """The condition cannot be parsed or evaluated (an Error measurement in Argo)."""


def _is_inf(value: float, sign: int = 0) -> bool:
    return math.isinf(value) and (sign == 0 or (value > 0) == (sign > 0))


def _default(result: Any) -> Callable[..., Any]:
    def default(value: Any, fallback: Any) -> Any:
        return fallback if value is None else value

    return default


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "isNaN": lambda x: isinstance(x, float) and math.isnan(x),
    "isInf": _is_inf,
    "asInt": lambda s: int(str(s)),
    "asFloat": lambda s: float(str(s)),
    "len": len,
    "abs": abs,
}


def tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ConditionError(f"unexpected character {text[pos]!r} at {pos} in {text!r}")
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind)))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return tokens


class _Parser:
    """A Pratt parser that evaluates as it goes; ``skip`` > 0 parses without evaluating (short-circuit)."""

    def __init__(self, text: str, env: dict[str, Any]) -> None:
        self.tokens = tokenize(text)
        self.pos = 0
        self.env = env
        self.skip = 0
        self.text = text

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token is None or (value is not None and token[1] != value):
            raise ConditionError(f"expected {value or 'more'} in {self.text!r}")
        self.pos += 1
        return token

    def expression(self, floor: int = 0) -> Any:
        left = self.unary()
        while True:
            token = self.peek()
            if token is None or token[1] not in _BINARY or _BINARY[token[1]] <= floor:
                return left
            op = self.take()[1]
            level = _BINARY[op]
            if op in ("&&", "and", "||", "or"):
                is_and = op in ("&&", "and")
                known = self._truth(left)
                decided = self.skip == 0 and known != is_and  # false && ..., true || ...: the right side is not run
                self.skip += decided
                right = self.expression(level)
                self.skip -= decided
                left = (not is_and) if decided else (None if self.skip else self._truth(right))
                continue
            right = self.expression(level)
            left = None if self.skip else self._apply(op, left, right)

    def unary(self) -> Any:
        token = self.peek()
        if token is not None and token[1] in ("!", "not", "-"):
            self.take()
            value = self.unary()
            if self.skip:
                return None
            return (not self._truth(value)) if token[1] != "-" else -self._number(value)
        return self.postfix(self.primary())

    def primary(self) -> Any:
        kind, value = self.take()
        if kind == "num":
            return float(value) if any(c in value for c in ".eE") else int(value)
        if kind == "str":
            return value[1:-1]
        if value == "(":
            inner = self.expression()
            self.take(")")
            return inner
        if kind == "name":
            if value in ("true", "false"):
                return value == "true"
            if value in ("nil", "null"):
                return None
            if self.peek() == ("op", "("):
                return self.call(value)
            if value not in self.env:
                raise ConditionError(f"unknown name {value!r} in {self.text!r}")
            return self.env[value]
        raise ConditionError(f"unexpected {value!r} in {self.text!r}")

    def call(self, name: str) -> Any:
        self.take("(")
        args: list[Any] = []
        while self.peek() != ("op", ")"):
            args.append(self.expression())
            if self.peek() == ("op", ","):
                self.take(",")
        self.take(")")
        if self.skip:
            return None
        function = FUNCTIONS.get(name) or (_default(self.env.get("result")) if name == "default" else None)
        if function is None:
            raise ConditionError(f"unknown function {name!r} in {self.text!r}")
        try:
            return function(*args)
        except (TypeError, ValueError) as exc:
            raise ConditionError(f"{name}({', '.join(map(repr, args))}): {exc}") from None

    def postfix(self, value: Any) -> Any:
        while self.peek() == ("op", "["):
            self.take("[")
            index = self.expression()
            self.take("]")
            if self.skip:
                value = None
                continue
            if not isinstance(value, list | tuple) or not isinstance(index, int):
                raise ConditionError(f"cannot index {value!r} with {index!r} in {self.text!r}")
            if not -len(value) <= index < len(value):
                raise ConditionError(f"index out of range: {index} (array length is {len(value)})")
            value = value[index]
        return value

    def _truth(self, value: Any) -> bool:
        if self.skip:
            return False
        if not isinstance(value, bool):
            raise ConditionError(f"{value!r} is not a boolean in {self.text!r}")
        return value

    def _number(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConditionError(f"{value!r} is not a number in {self.text!r}")
        return value

    def _apply(self, op: str, left: Any, right: Any) -> Any:
        if op == "==":
            return left == right
        if op == "!=":
            return left != right
        a, b = self._number(left), self._number(right)
        if op in ("<", "<=", ">", ">="):
            return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if b == 0 and isinstance(a, int) and isinstance(b, int):
            raise ConditionError(f"integer division by zero in {self.text!r}")
        if op == "/":
            return a / b if b else (math.nan if a == 0 else math.copysign(math.inf, a))
        return math.fmod(a, b)


def evaluate(condition: str, result: Any) -> bool:
    """The condition's value for this measurement's ``result``; a non-boolean outcome is a ConditionError."""
    parser = _Parser(condition, {"result": result})
    try:
        value = parser.expression()
    except (ArithmeticError, ValueError) as exc:
        if isinstance(exc, ConditionError):
            raise
        raise ConditionError(f"{condition!r}: {exc}") from None
    if parser.peek() is not None:
        raise ConditionError(f"unexpected {parser.peek()[1]!r} in {condition!r}")  # type: ignore[index]
    if not isinstance(value, bool):
        raise ConditionError(f"{condition!r} is not a boolean: {value!r}")
    return value
