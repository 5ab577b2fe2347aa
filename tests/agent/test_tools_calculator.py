"""The calculator tool: exact arithmetic from an AST walk, and clear refusals of everything else."""

import json
import math

import pytest

from k2batch.agent.tools import TOOLS, ToolContext, ToolSettings
from k2batch.agent.tools.calculator import CalculatorError, calculate


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("-7 % 3", 2),
        ("2 ** 10", 1024),
        ("2 ** -1", 0.5),
        ("-(3 - 5)", 2),
        ("+4", 4),
        ("abs(-2.5)", 2.5),
        ("round(2.675, 2)", 2.67),
        ("round(7.5)", 8),
        ("min(3, 1, 2) + max(4, 5)", 6),
        ("sqrt(16)", 4.0),
        ("log(e)", 1.0),
        ("exp(0)", 1.0),
        ("2 * pi", 2 * math.pi),
        ("12345678901234567890 * 98765432109876543210", 12345678901234567890 * 98765432109876543210),
        ("1e3 + 0.5", 1000.5),
    ],
)
def test_arithmetic(expression: str, value: float) -> None:
    assert calculate(expression) == value


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os')", "function '__import__' is not allowed"),
        ("__import__('os').system('ls')", "only functions named directly can be called"),
        ("x + 1", "unknown name 'x'"),
        ("(1).__class__", "Attribute is not allowed"),
        ("pi.real", "Attribute is not allowed"),
        ("'a' * 3", "str literals are not allowed"),
        ("True + 1", "bool literals are not allowed"),
        ("[1, 2]", "List is not allowed"),
        ("lambda: 1", "Lambda is not allowed"),
        ("1 if 2 else 3", "IfExp is not allowed"),
        ("1 < 2", "Compare is not allowed"),
        ("1 << 2", "BinOp is not allowed"),
        ("round(2.5, ndigits=1)", "positional arguments only"),
        ("9 ** 9 ** 9", "is larger than 10000"),
        ("10 ** 5000", "would exceed 4096 bits"),
        ("2.0 ** 5000", "Numerical result out of range"),
        ("exp(1000)", "math range error"),
        ("1 / 0", "division by zero"),
        ("sqrt(-1)", "math domain error"),
        ("(-8) ** 0.5", "complex number"),
        ("round(5, -10 ** 9)", "digits must be within"),
        ("1 +", "not an arithmetic expression"),
        ("-" * 1500 + "1", "nested too deeply"),
        ("1" * 3000, "the limit is 2000"),
    ],
)
def test_refusals(expression: str, message: str) -> None:
    with pytest.raises(CalculatorError, match=message):
        calculate(expression)


def test_through_the_registry() -> None:
    ctx = ToolContext.for_job("job-1", "synthesis", ToolSettings())
    ok = TOOLS.call("calculator", json.dumps({"expression": "3 * (4 + 5)"}), ctx, 5.0, 1000)
    assert (ok.content, ok.error_type) == ("27", None)
    refused = TOOLS.call("calculator", json.dumps({"expression": "open('/etc/passwd')"}), ctx, 5.0, 1000)
    assert refused.error_type == "tool_error"
    assert refused.content.startswith("error: tool 'calculator' failed: CalculatorError: function 'open'")
