"""The episode loop on a tiny random K2 model: tools run, results go back as continuations, traces replay."""

from __future__ import annotations

import pytest

from k2batch.agent import Budgets, EpisodeSpec, recorded_caller, registry_caller, run_episodes
from k2batch.agent.tools import TOOLS, ToolContext, ToolResult, ToolSettings
from tests.agent.conftest import engine_for, script_first_step

CALLS = (
    "<think>add them</think>"
    "<|tool_calls_section_begin|>"
    '<|tool_call_begin|>functions.calculator:0<|tool_call_argument_begin|>{"expression": "2+3"}<|tool_call_end|>'
    "<|tool_call_begin|>functions.nope:1<|tool_call_argument_begin|>{}<|tool_call_end|>"
    "<|tool_calls_section_end|><|im_end|>"
)
TOOL_NAMES = ("calculator", "now")


def spec(
    job_id: str, *, max_steps: int = 4, max_new_tokens: int = 96, per_episode: int = 76, context: int = 4096
) -> EpisodeSpec:
    return EpisodeSpec(
        job_id=job_id, task="synthesis",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is 2+3? ({job_id})"}],
        tools=TOOL_NAMES, tool_schemas=TOOLS.schemas(TOOL_NAMES), temperature=0.0, top_p=1.0, top_k=0, seed=7,
        budgets=Budgets(max_steps=max_steps, max_new_tokens=max_new_tokens, max_new_tokens_per_episode=per_episode,
                        max_context_tokens=context),
    )  # fmt: skip


def caller(job_ids):
    settings = ToolSettings(now="2025-11-06T00:00:00Z")
    contexts = {j: ToolContext.for_job(j, "synthesis", settings) for j in job_ids}
    return registry_caller(TOOLS, contexts, {j: TOOL_NAMES for j in job_ids}, timeout_s=5.0, max_result_chars=1000)


@pytest.fixture()
def scripted_engine(k2_checkpoint):
    engine = engine_for(k2_checkpoint)
    script_first_step(engine, engine.tokenizer.encode_chat(CALLS))
    return engine


def test_tools_run_and_results_continue_the_prompt(scripted_engine):
    engine = scripted_engine
    jobs = ["a", "b", "c"]
    outcomes = run_episodes(engine, engine.tokenizer, [spec(j) for j in jobs], caller(jobs), tool_workers=2)
    for outcome in outcomes:
        result, spans = outcome.result, outcome.spans
        assert result.steps >= 2 and result.tool_calls == 2
        assert result.status in ("ok", "token_limit", "step_limit")
        tools = [s for s in spans if s.operation == "execute_tool"]
        assert [(s.tool_name, s.tool_result, s.error_type) for s in tools][0] == ("calculator", "5", None)
        assert tools[1].tool_name == "nope" and tools[1].error_type == "unknown_tool"  # a tool error, not the end
        assert tools[0].tool_call_id == "functions.calculator:0" and tools[0].tool_arguments == '{"expression": "2+3"}'
        chats = [s for s in spans if s.operation == "chat"]
        assert chats[0].finish_reason == "tool_calls" and chats[0].reasoning_content == "add them"
        assert all(t.parent_span_id == chats[0].span_id for t in tools)
        assert [t.span_id for t in tools[:2]] == [f"{result.job_id}/0/tool0", f"{result.job_id}/0/tool1"]
        assert len({s.span_id for s in spans}) == len(spans)
        # Step 2 prefilled only the delta: its whole previous context came from the kept KV.
        assert chats[1].cached_input_tokens >= chats[0].input_tokens + chats[0].output_tokens - 1
        assert result.cached_prompt_tokens >= chats[1].cached_input_tokens
    # Every episode ended, so no KV stays pinned.
    assert not engine.scheduler.kept


def test_second_prompt_is_previous_context_plus_rendered_delta(scripted_engine):
    from k2batch.tokenizer import render_chat

    engine = scripted_engine
    seen = []
    add = engine.add_request
    engine.add_request = lambda ids, params, **kw: seen.append((list(ids), kw)) or add(ids, params, **kw)
    (outcome,) = run_episodes(engine, engine.tokenizer, [spec("solo")], caller(["solo"]))
    (first, kw0), (second, kw1) = seen[0], seen[1]
    assert kw0["continue_from"] is None and kw1["continue_from"] == "solo:0"
    assert second[: len(first)] == first
    assert second[len(first) : len(first) + len(outcome.step_token_ids[0])] == outcome.step_token_ids[0]
    text = engine.tokenizer.decode(second)
    assert text.endswith("## Return of functions.nope:1\nerror: unknown tool 'nope'; available: calculator, now"
                         "<|im_end|><|im_assistant|>assistant<|im_middle|>")  # fmt: skip
    messages = spec("solo").messages
    assert text.startswith(render_chat(None, messages, TOOLS.schemas(TOOL_NAMES), add_generation_prompt=True))


def test_budgets_end_episodes_with_their_status(scripted_engine):
    engine = scripted_engine
    outcomes = run_episodes(
        engine, engine.tokenizer,
        [spec("steps", max_steps=1), spec("tokens", max_new_tokens=5), spec("episode", per_episode=20)],
        caller(["steps", "tokens", "episode"]),
    )  # fmt: skip
    statuses = {o.result.job_id: o.result.status for o in outcomes}
    assert statuses == {"steps": "step_limit", "tokens": "token_limit", "episode": "token_limit"}
    assert outcomes[0].result.tool_calls == 2 and outcomes[0].result.steps == 1
    assert not engine.scheduler.kept


def test_replay_with_recorded_results_reproduces_tokens(k2_checkpoint):
    def run(call):
        engine = engine_for(k2_checkpoint)
        script_first_step(engine, engine.tokenizer.encode_chat(CALLS))
        return run_episodes(engine, engine.tokenizer, [spec("r")], call)[0]

    original = run(caller(["r"]))
    replayed = run(recorded_caller(original.spans))
    assert replayed.step_token_ids == original.step_token_ids
    assert [s.tool_result for s in replayed.spans] == [s.tool_result for s in original.spans]


def test_context_overflow_hides_earlier_tool_results(k2_checkpoint):
    def long_first_results(job_id, step, tool_call_id, name, arguments):
        return ToolResult("word " * 100 if step == 0 else "ok")

    def run(context):
        engine = engine_for(k2_checkpoint)
        script_first_step(engine, engine.tokenizer.encode_chat(CALLS), steps=(0, 1))
        prompts = []
        add = engine.add_request
        engine.add_request = lambda ids, params, **kw: prompts.append(list(ids)) or add(ids, params, **kw)
        job = spec("h", max_steps=3, max_new_tokens=80, per_episode=400, context=context)
        outcome = run_episodes(engine, engine.tokenizer, [job], long_first_results)[0]
        return outcome, [engine.tokenizer.decode(p) for p in prompts]

    roomy, roomy_prompts = run(4096)
    full = [s.input_tokens for s in roomy.spans if s.operation == "chat"][2]
    tight, tight_prompts = run(full + 10)  # too little room for step 2 with every result shown
    assert "word word" in roomy_prompts[2] and "word word" not in tight_prompts[2]
    assert tight_prompts[2].count("[tool result hidden to fit the context]") == 2  # both calls of step 0
    assert tight_prompts[2].endswith("nope:1\nok<|im_end|><|im_assistant|>assistant<|im_middle|>")
    chats = [s for s in tight.spans if s.operation == "chat"]
    assert len(chats) == 3 and chats[2].input_tokens < full
