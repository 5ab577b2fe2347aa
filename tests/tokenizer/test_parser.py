"""Parsing K2 assistant output: well-formed variants, and malformed output that is reported, never raised."""

from __future__ import annotations

import random

import pytest

from k2batch.tokenizer import ParsedAssistant, ToolCall, assistant_message, parse_assistant

SECTION, END_SECTION = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
ARG, END_CALL = "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def call(call_id: str, arguments: str) -> str:
    return f"<|tool_call_begin|>{call_id}{ARG}{arguments}{END_CALL}"


SEARCH = call("functions.search:0", '{"query": "x"}')


def test_answer_without_reasoning_or_end_marker():
    parsed = parse_assistant("Just an answer.")
    assert parsed == ParsedAssistant("", "Just an answer.", [], [], "stop")


def test_think_opened_by_the_generation_prompt():
    parsed = parse_assistant("still thinking</think>answer<|im_end|>")
    assert (parsed.reasoning, parsed.content, parsed.errors) == ("still thinking", "answer", [])


def test_a_template_that_opens_think_makes_untagged_output_reasoning():
    """With `thinking` (the generation prompt ends in <think>), output with neither tag is reasoning up to the
    tool-call section, or all reasoning when cut off; without it the same text is content."""
    calls = f"need the data{SECTION}{SEARCH}{END_SECTION}"
    parsed = parse_assistant(calls, {"search"}, thinking=True)
    assert (parsed.reasoning, parsed.content, parsed.errors, parsed.finish) == ("need the data", "", [], "tool_calls")
    assert parse_assistant(calls, {"search"}).content == "need the data"
    cut = parse_assistant("and then I will", thinking=True)
    assert (cut.reasoning, cut.content) == ("and then I will", "") and "reasoning not closed" in cut.errors[0]
    closed = parse_assistant("<think>x</think>answer", thinking=True)  # a repeated opener is fine
    assert (closed.reasoning, closed.content, closed.errors) == ("x", "answer", [])


def test_reasoning_runs_into_the_tool_section_without_think_end():
    parsed = parse_assistant(f"<think>need data{SECTION}{SEARCH}{END_SECTION}")
    assert (parsed.reasoning, parsed.content, parsed.errors, parsed.finish) == ("need data", "", [], "tool_calls")
    assert parsed.tool_calls == [ToolCall("functions.search:0", "search", '{"query": "x"}', 0)]


def test_reasoning_cut_off():
    parsed = parse_assistant("<think>and then I will")
    assert (parsed.reasoning, parsed.content, parsed.finish) == ("and then I will", "", "stop")
    assert parsed.errors == [
        "reasoning not closed: no </think> and no tool-call section (output cut off while thinking?)"
    ]


def test_text_after_im_end():
    parsed = parse_assistant("<think></think>done<|im_end|>garbage")
    assert parsed.content == "done"
    assert parsed.errors == ["text after <|im_end|> ignored: 'garbage'"]


def test_unclosed_section_keeps_its_calls():
    parsed = parse_assistant(f"<think>r</think>{SECTION}{SEARCH}")
    assert parsed.errors == ["tool-call section not closed: no <|tool_calls_section_end|>"]
    assert [c.name for c in parsed.tool_calls] == ["search"] and parsed.finish == "tool_calls"


def test_unclosed_call_is_reported_on_the_call():
    parsed = parse_assistant(f'<think>r</think>{SECTION}<|tool_call_begin|>functions.search:0{ARG}{{"query": "x')
    [bad] = parsed.tool_calls
    assert bad.arguments == '{"query": "x'
    assert bad.error.startswith("not closed: no <|tool_call_end|>; arguments are not valid JSON")
    assert parsed.errors[0] == "tool-call section not closed: no <|tool_calls_section_end|>"
    assert parsed.errors[1] == "tool call 0 'functions.search:0': not closed: no <|tool_call_end|>"
    assert parsed.errors[2].startswith("tool call 0 'functions.search:0': arguments are not valid JSON (")


def test_invalid_json_arguments_keep_the_call_for_an_error_result():
    calls = call("functions.search:0", "{query: x}") + call("functions.now:1", "{}")
    output = f"<think>r</think>{SECTION}{calls}{END_SECTION}"
    parsed = parse_assistant(output)
    bad, good = parsed.tool_calls
    assert bad.error.startswith("arguments are not valid JSON (Expecting property name enclosed in double quotes")
    assert bad.error.endswith("): '{query: x}'")
    assert good == ToolCall("functions.now:1", "now", "{}", 1)
    assert parsed.errors == [f"tool call 0 'functions.search:0': {bad.error}"]


def test_arguments_must_be_an_object():
    parsed = parse_assistant(f"{SECTION}{call('functions.search:0', '[1, 2]')}{END_SECTION}")
    assert parsed.tool_calls[0].error == "arguments must be a JSON object, got '[1, 2]'"


def test_unknown_function_only_when_tool_names_given():
    output = f"<think></think>{SECTION}{call('functions.rm_rf:0', '{}')}{END_SECTION}"
    assert parse_assistant(output).errors == []
    parsed = parse_assistant(output, tool_names={"search", "calculator"})
    assert parsed.errors == ["tool call 0 'functions.rm_rf:0': unknown tool 'rm_rf'; available: calculator, search"]
    assert parsed.tool_calls[0].name == "rm_rf" and parsed.finish == "tool_calls"


def test_missing_argument_marker_drops_only_that_call():
    output = f"{SECTION}<|tool_call_begin|>functions.search:0{{}}{END_CALL}{call('functions.now:1', '{}')}{END_SECTION}"
    parsed = parse_assistant(output)
    assert parsed.errors == ["tool call 0 'functions.search:0{}': missing <|tool_call_argument_begin|>; call dropped"]
    assert [(c.name, c.index) for c in parsed.tool_calls] == [("now", 1)]


def test_empty_section_and_stray_text():
    parsed = parse_assistant(f"<think></think>hi{SECTION}oops{END_SECTION}tail")
    assert parsed.content == "hi" and parsed.finish == "stop"
    assert parsed.errors == [
        "text after the tool-call section ignored: 'tail'",
        "text before the first tool call ignored: 'oops'",
        "tool-call section holds no tool calls",
    ]


def test_calls_outside_a_section():
    parsed = parse_assistant(f"<think></think>{SEARCH}")
    assert parsed.tool_calls == [] and parsed.errors == [
        "tool calls outside a tool-call section ignored (no <|tool_calls_section_begin|> before them)"
    ]


def test_stray_tool_call_markup_in_an_answer_is_an_error():
    """A model that loses its place can write the tail of a call as its answer (seen from the demo model on a
    name no document holds): the answer is not clean, so the parser says so."""
    parsed = parse_assistant('<think>x</think>Qubertzon", "k": 3}<|tool_call_end|><|tool_calls_section_end|>')
    assert parsed.tool_calls == [] and parsed.finish == "stop"
    assert parsed.errors == [
        "tool-call markup in the content: <|tool_call_end|>, <|tool_calls_section_end|> "
        "(no <|tool_calls_section_begin|> before it)"
    ]
    assert parse_assistant("<think>x</think>It was founded in 1616 [doc-0036].").errors == []


@pytest.mark.parametrize(
    ("call_id", "name", "error"),
    [
        ("functions.search:12", "search", None),
        ("functions.web.fetch:0", "fetch", None),
        ("search", "search", None),
        ("functions.:3", "", "id 'functions.:3' names no function"),
    ],
)
def test_function_name_from_call_id(call_id, name, error):
    [parsed] = parse_assistant(f"{SECTION}{call(call_id, '{}')}{END_SECTION}").tool_calls
    assert (parsed.name, parsed.error) == (name, error)


@pytest.mark.parametrize(
    ("call_id", "name", "error"),
    [
        ("search_0", "search", None),
        ("call-read_object-1", "read_object", None),
        ("tools/read_object#2", "read_object", None),  # "read" is declared too, but inside "read_object"
        ("call_7", "call_7", "unknown tool 'call_7'; available: read, read_object, search"),
        ("search_or_read:0", "search_or_read", "unknown tool 'search_or_read'; available: read, read_object, search"),
        ("researcher:0", "researcher", "unknown tool 'researcher'; available: read, read_object, search"),
    ],
)
def test_other_id_forms_resolve_to_the_one_declared_tool_they_name(call_id, name, error):
    tools = {"search", "read", "read_object"}
    [parsed] = parse_assistant(f"{SECTION}{call(call_id, '{}')}{END_SECTION}", tools).tool_calls
    assert (parsed.id, parsed.name, parsed.error) == (call_id, name, error)


def test_assistant_message_shape():
    parsed = parse_assistant(f"<think>r</think>c{SECTION}{SEARCH}{END_SECTION}<|im_end|>")
    assert assistant_message(parsed) == {
        "role": "assistant",
        "content": "c",
        "reasoning_content": "r",
        "tool_calls": [
            {
                "id": "functions.search:0",
                "type": "function",
                "function": {"name": "search", "arguments": '{"query": "x"}'},
            }
        ],
    }


def test_never_raises_on_scrambled_output():
    fragments = [
        "<think>",
        "</think>",
        SECTION,
        END_SECTION,
        "<|tool_call_begin|>",
        ARG,
        END_CALL,
        "<|im_end|>",
        "functions.search:0",
        '{"a": 1}',
        "{",
        "text",
        ":",
        ".",
        " ",
    ]
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice(fragments) for _ in range(rng.randint(0, 12)))
        parsed = parse_assistant(text, tool_names={"search"})
        assert parsed.finish == ("tool_calls" if parsed.tool_calls else "stop")
