"""The `calculator` tool: arithmetic evaluated by walking the expression's AST, never by eval."""

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from .context import ToolContext
from .registry import TOOLS

MAX_EXPRESSION_CHARS = 2000  # also keeps the parser far from its nesting limits
MAX_INT_BITS = 4096  # about 1,200 decimal digits: bounds memory and time of every intermediate
MAX_EXPONENT = 10_000
MAX_ROUND_DIGITS = 100  # round(5, -10**9) would build 10**(10**9) internally


class CalculatorError(ValueError):
    pass


def _round(number: int | float, ndigits: int | None = None) -> int | float:
    if ndigits is not None and abs(ndigits) > MAX_ROUND_DIGITS:
        raise CalculatorError(f"round() digits must be within ±{MAX_ROUND_DIGITS}")
    return round(number, ndigits)


_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "abs": abs,
    "round": _round,
    "min": min,
    "max": max,
    "sqrt": math.sqrt,
    "log": math.log,
    "exp": math.exp,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}
_ALLOWED = "numbers, + - * / // % ** and parentheses, pi, e, and " + ", ".join(f"{f}()" for f in _FUNCTIONS)


def _checked(value: Any) -> int | float:
    if isinstance(value, complex):
        raise CalculatorError("the result is a complex number; only real arithmetic is supported")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is not a finite number")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"an intermediate result exceeds {MAX_INT_BITS} bits")
    return value


def _power(base: int | float, exponent: int | float) -> int | float:
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {exponent} is larger than {MAX_EXPONENT}")
    # Estimate before computing: an integer power's size is known from the operands.
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        bits = (abs(base).bit_length() - 1) * exponent
        if bits > MAX_INT_BITS:
            raise CalculatorError(f"{base} ** {exponent} would exceed {MAX_INT_BITS} bits")
    return base**exponent


def _evaluate(node: ast.AST) -> int | float:
    match node:
        case ast.Expression(body=body):
            return _evaluate(body)
        case ast.Constant(value=value) if type(value) in (int, float):
            return _checked(value)
        case ast.Name(id=name) if name in _CONSTANTS:
            return _CONSTANTS[name]
        case ast.UnaryOp(op=op, operand=operand) if type(op) in _UNARY:
            return _checked(_UNARY[type(op)](_evaluate(operand)))
        case ast.BinOp(left=left, op=ast.Pow(), right=right):
            return _checked(_power(_evaluate(left), _evaluate(right)))
        case ast.BinOp(left=left, op=op, right=right) if type(op) in _BINARY:
            return _checked(_BINARY[type(op)](_evaluate(left), _evaluate(right)))
        case ast.Call(func=ast.Name(id=name), args=args, keywords=[]) if name in _FUNCTIONS:
            return _checked(_FUNCTIONS[name](*(_evaluate(arg) for arg in args)))
        case ast.Call(func=ast.Name(id=name)) if name in _FUNCTIONS:
            raise CalculatorError("calls take positional arguments only, e.g. round(x, 2)")
        case ast.Call(func=ast.Name(id=name)):
            raise CalculatorError(f"function {name!r} is not allowed; allowed: {_ALLOWED}")
        case ast.Call():
            raise CalculatorError(f"only functions named directly can be called; allowed: {_ALLOWED}")
        case ast.Name(id=name):
            raise CalculatorError(f"unknown name {name!r}; allowed: {_ALLOWED}")
        case ast.Constant(value=value):
            raise CalculatorError(f"{type(value).__name__} literals are not allowed; allowed: {_ALLOWED}")
        case _:
            raise CalculatorError(f"{type(node).__name__} is not allowed; allowed: {_ALLOWED}")


def calculate(expression: str) -> int | float:
    """Evaluate an arithmetic expression; raise CalculatorError for anything else."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression has {len(expression)} characters; the limit is {MAX_EXPRESSION_CHARS}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        return _evaluate(tree)
    except SyntaxError as error:
        raise CalculatorError(f"not an arithmetic expression: {error.msg}") from None
    except RecursionError:
        raise CalculatorError("the expression is nested too deeply") from None
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except CalculatorError:
        raise
    except (OverflowError, ValueError, TypeError) as error:
        raise CalculatorError(str(error)) from None


@TOOLS.tool(
    name="calculator",
    description="Evaluate an arithmetic expression exactly, e.g. '(3 + 4) * 2 ** 10 / 7' or 'sqrt(2) * pi'. "
    f"Supports {_ALLOWED}.",
    parameters={
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "the arithmetic expression"}},
        "required": ["expression"],
    },
)
def calculator(args: dict[str, Any], ctx: ToolContext) -> str:
    return repr(calculate(args["expression"]))
