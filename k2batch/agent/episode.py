"""The episode loop: many jobs' think → call tools → read results turns, run together through one engine."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Literal

import msgspec

from k2batch.agent import heavy
from k2batch.agent.tools import ToolContext, ToolRegistry, ToolResult
from k2batch.engine import Engine, RequestOutput, SamplingParams
from k2batch.records import Candidate, Result, Status, TraceSpan
from k2batch.tokenizer import ParsedAssistant, Tokenizer, assistant_message, parse_assistant, render_chat
from k2batch.tokenizer.parser import THINK_BEGIN

log = logging.getLogger(__name__)

# call_tool(job_id, trajectory, step, tool_call_id, name, arguments_json) -> ToolResult; replay swaps in recorded
# results. `trajectory` tells a heavy job's trajectories apart (0 for every other job).
ToolCaller = Callable[[str, int, int, str, str, str], ToolResult]


class Budgets(msgspec.Struct, frozen=True, kw_only=True):
    """Limits of one episode."""

    max_steps: int
    max_new_tokens: int
    """Per step (one model turn)."""
    max_new_tokens_per_episode: int
    max_context_tokens: int
    hidden_tool_result: str = "[tool result hidden to fit the context]"
    """Replaces earlier steps' tool results when the context would overflow."""
    min_new_tokens: int = 16
    """Room a step needs; with less left, earlier tool results are hidden to make room."""


class EpisodeSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What an episode starts from: the conversation, the tools it may call, its sampling and budgets."""

    job_id: str
    task: str | None
    messages: list[dict[str, Any]]
    tools: tuple[str, ...]
    tool_schemas: list[dict[str, Any]]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    budgets: Budgets
    heavy: int = 1
    """Trajectories from the one prompt, aggregated into the answer (k2batch.agent.heavy); 1: a plain episode."""
    aggregation: Literal["model", "vote"] = "model"
    source_file: str = ""
    source_row: int = 0


class EpisodeOutcome(msgspec.Struct, frozen=True, kw_only=True):
    result: Result
    spans: list[TraceSpan]
    """Chat spans carry each step's generated ids (output_token_ids), step 0 also what the episode started from."""


class _Episode:
    """The running state of one trajectory of a job (a plain job has one), or of a heavy job's aggregation turn."""

    def __init__(self, spec: EpisodeSpec, job: _Job, trajectory: int | None, seed: int) -> None:
        self.spec = spec
        self.job = job
        self.trajectory = trajectory
        """None: the aggregation turn."""
        self.seed = seed
        """Step s samples with seed + s."""
        self.record: str | None = None
        """The aggregation turn's record (which candidates it read), for its span."""
        self.messages = list(spec.messages)
        self.step = 0
        self.prompt_ids: list[int] = []
        self.request_id: str | None = None
        self.prompt_tokens = self.cached_tokens = self.completion_tokens = self.reasoning_tokens = 0
        self.tool_call_count = 0
        self.spans: list[TraceSpan] = []
        self.step_token_ids: list[list[int]] = []
        self.step_start_ns = 0
        self.params: SamplingParams | None = None
        self.started = time.perf_counter()
        self.pending: dict[Future[ToolResult], tuple[Any, int, int]] = {}
        self.tool_results: list[tuple[Any, ToolResult, int, int] | None] = []
        self.last: ParsedAssistant | None = None
        self.result: Result | None = None
        self.thinking = False
        """The chat template's generation prompt opens <think>: the output starts inside the reasoning."""

    @property
    def label(self) -> str:
        """The job id, and for a heavy job which trajectory (or the aggregation): request and span ids start so."""
        if self.trajectory is None:
            return f"{self.spec.job_id}/aggregate"
        return self.spec.job_id if self.job.spec.heavy == 1 else f"{self.spec.job_id}/t{self.trajectory}"

    def span_id(self, step: int, kind: str, index: int = 0) -> str:
        return f"{self.label}/{step}/{kind}{index}"


class _Job:
    """One job: its trajectories, and for a heavy job the aggregation that makes its answer."""

    def __init__(self, spec: EpisodeSpec) -> None:
        self.spec = spec
        self.trajectories = [_Episode(spec, self, t, heavy.trajectory_seed(spec.seed, t)) for t in range(spec.heavy)]
        self.aggregator: _Episode | None = None
        self.candidates: list[Candidate] = []
        self.outcome: EpisodeOutcome | None = None
        self.started = time.perf_counter()


def render(tokenizer: Tokenizer, spec: EpisodeSpec, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    tools = spec.tool_schemas or None
    # Escaped: what users and tools write is text, even where it spells a control token.
    return render_chat(
        tokenizer.chat_template, messages, tools, add_generation_prompt=generation_prompt, escape=tokenizer.escape
    )


def run_episodes(
    engine: Engine,
    tokenizer: Tokenizer,
    specs: Sequence[EpisodeSpec],
    call_tool: ToolCaller,
    *,
    tool_workers: int = 8,
    on_done: Callable[[EpisodeOutcome], None] | None = None,
) -> list[EpisodeOutcome]:
    """Run all episodes to an end; outcomes in the order of `specs`.

    Tool calls run in a thread pool while the engine keeps decoding the other episodes; an episode's next step
    is queued as a continuation of its previous request once all of its tool calls are back."""
    stop_ids = tuple(tokenizer.special_tokens[t] for t in ("<|im_end|>",) if t in tokenizer.special_tokens)
    jobs = [_Job(spec) for spec in specs]
    by_request: dict[str, _Episode] = {}
    calls: dict[Future[ToolResult], _Episode] = {}
    """Tool calls running, and whose they are."""
    open_jobs = [len(jobs)]

    def finish(ep: _Episode, status: Status, error_type: str | None = None, message: str | None = None) -> None:
        if ep.request_id is not None:
            engine.release(ep.request_id)
        ep.result = Result(
            job_id=ep.spec.job_id,
            task=ep.spec.task,
            status=status,
            answer=ep.last.content if ep.last and status == "ok" else None,
            reasoning=ep.last.reasoning if ep.last else None,
            error_type=error_type,
            error_message=message,
            steps=ep.step,
            tool_calls=ep.tool_call_count,
            prompt_tokens=ep.prompt_tokens,
            cached_prompt_tokens=ep.cached_tokens,
            completion_tokens=ep.completion_tokens,
            reasoning_tokens=ep.reasoning_tokens,
            latency_s=time.perf_counter() - ep.started,
            source_file=ep.spec.source_file,
            source_row=ep.spec.source_row,
        )
        if ep.job.spec.heavy == 1:
            conclude(ep.job, EpisodeOutcome(result=ep.result, spans=ep.spans))
            return
        try:
            aggregate(ep.job)
        except Exception as error:  # the aggregation of one job must not end the shard
            if ep.job.outcome is not None:
                raise  # raised by on_done, after the job ended: the caller's own failure
            log.warning("job %s: the aggregation failed", ep.spec.job_id, exc_info=error)
            conclude_heavy(ep.job, None, None, ("error", "aggregation_error", f"{type(error).__name__}: {error}"))

    def conclude(job: _Job, outcome: EpisodeOutcome) -> None:
        job.outcome = outcome
        open_jobs[0] -= 1
        if on_done is not None:
            on_done(outcome)

    def aggregate(job: _Job) -> None:
        """Once every trajectory has ended: vote, or start the aggregation turn; once that has ended, conclude."""
        if any(t.result is None for t in job.trajectories) or job.outcome is not None:
            return
        spec, k = job.spec, job.spec.heavy
        if job.aggregator is not None:
            done = job.aggregator.result
            assert done is not None
            if done.status == "ok":
                return conclude_heavy(job, done.answer, done.reasoning, None)
            why = f"the aggregation turn ended {done.status} ({done.error_type}): {done.error_message}"
            return conclude_heavy(job, None, done.reasoning, ("error", "aggregation_error", why))
        job.candidates = [heavy.candidate(t.trajectory or 0, t.result) for t in job.trajectories]  # type: ignore[arg-type]
        answers = heavy.answered(job.candidates)
        if not answers:
            first = job.trajectories[0].result
            assert first is not None
            why = f"none of the {k} trajectories answered; trajectory 0: {first.error_message}"
            return conclude_heavy(job, None, None, (first.status, first.error_type or first.status, why))
        if spec.aggregation == "vote":
            winner, record = heavy.vote(answers)
            now = time.time_ns()
            span = TraceSpan(
                job_id=spec.job_id,
                trajectory=None,
                step=0,
                span_id=f"{spec.job_id}/aggregate/0/vote0",
                parent_span_id=None,
                operation="aggregate",
                start_ns=now,
                end_ns=now,
                content=winner.answer,
                aggregation=_json(record),
            )
            reasoning = job.trajectories[winner.trajectory].result.reasoning  # type: ignore[union-attr]
            return conclude_heavy(job, winner.answer, reasoning, None, span)
        # The model reads the answered candidates after the job's own conversation, with no tools and one turn.
        turn = msgspec.structs.replace(
            spec,
            messages=heavy.aggregation_messages(spec.messages, answers),
            tools=(),
            tool_schemas=[],
            heavy=1,
            budgets=msgspec.structs.replace(spec.budgets, max_steps=1),
        )
        job.aggregator = _Episode(turn, job, None, heavy.trajectory_seed(spec.seed, k))
        job.aggregator.record = heavy.aggregation_record("model", answers)
        start(job.aggregator)

    def conclude_heavy(
        job: _Job,
        answer: str | None,
        reasoning: str | None,
        failure: tuple[str, str, str] | None,
        span: TraceSpan | None = None,
    ) -> None:
        episodes = job.trajectories + ([job.aggregator] if job.aggregator else [])
        parts = [ep.result for ep in episodes if ep.result is not None]
        if not job.candidates:
            job.candidates = [heavy.candidate(t.trajectory or 0, t.result) for t in job.trajectories if t.result]
        result = heavy.combine(
            job.trajectories[0].result or parts[0],
            parts,
            job.candidates,
            time.perf_counter() - job.started,
            answer=answer,
            reasoning=reasoning,
            failure=failure,
        )
        spans = [span for ep in episodes for span in ep.spans] + ([span] if span else [])
        conclude(job, EpisodeOutcome(result=result, spans=spans))

    def fail(ep: _Episode, error: Exception) -> None:
        """An unexpected exception while handling one episode ends that episode alone, with status error."""
        if ep.result is not None:
            raise error  # raised by on_done, after the episode ended: the caller's own failure
        log.warning("job %s: step %d failed", ep.spec.job_id, ep.step, exc_info=error)
        ep.pending.clear()  # calls still running are left to finish; their results are dropped
        finish(ep, "error", "episode_error", f"{type(error).__name__}: {error} ({ep.step} steps done)")

    def guarded(ep: _Episode, handle: Callable[..., None], *args: Any) -> None:
        try:
            handle(ep, *args)
        except Exception as error:  # any one job's failure, wherever in its step, must not end the shard
            fail(ep, error)

    def start(ep: _Episode) -> None:
        prompt = render(tokenizer, ep.spec, ep.messages, True)
        ep.thinking = prompt.rstrip().endswith(THINK_BEGIN)  # the template opens the reasoning itself
        submit_step(ep, tokenizer.encode_chat(prompt), None)

    def collect(ep: _Episode, future: Future[ToolResult]) -> None:
        if future not in ep.pending:  # the episode failed while the call ran: its result is dropped
            return
        call, position, start_ns = ep.pending.pop(future)
        ep.tool_results[position] = (call, future.result(), start_ns, time.time_ns())
        if not ep.pending:
            on_tools_done(ep)

    def submit_step(ep: _Episode, prompt_ids: list[int], continue_from: str | None) -> None:
        budgets = ep.spec.budgets
        if ep.step >= budgets.max_steps:
            return finish(ep, "step_limit", "step_limit", f"episode used its {budgets.max_steps} steps")
        left = min(
            budgets.max_new_tokens,
            budgets.max_new_tokens_per_episode - ep.completion_tokens,
            budgets.max_context_tokens - len(prompt_ids),
        )
        if left <= 0:
            why = (
                f"no token budget left for step {ep.step} ({len(prompt_ids):,} context tokens, "
                f"{ep.completion_tokens:,} generated, context budget {budgets.max_context_tokens:,})"
            )
            return finish(ep, "token_limit", "token_limit", why)
        params = SamplingParams(
            temperature=ep.spec.temperature,
            top_p=ep.spec.top_p,
            top_k=ep.spec.top_k,
            max_new_tokens=left,
            seed=ep.seed + ep.step,
            stop_token_ids=stop_ids,
        )
        request_id = f"{ep.label}:{ep.step}"
        ep.step_start_ns = time.time_ns()
        engine.add_request(prompt_ids, params, request_id=request_id, keep_kv=True, continue_from=continue_from)
        # Only once the engine holds the request: until then ep.request_id names the previous, pinned one.
        ep.prompt_ids, ep.params, ep.request_id = prompt_ids, params, request_id
        by_request[request_id] = ep

    def on_output(ep: _Episode, out: RequestOutput) -> None:
        text = tokenizer.decode([t for t in out.token_ids if t < tokenizer.vocab_size])
        parsed = parse_assistant(text, set(ep.spec.tools), ep.thinking)
        reasoning_ids = len(tokenizer.encode(parsed.reasoning)) if parsed.reasoning else 0
        # Every step counts its whole prompt, as an API bills it; the cached part is counted separately.
        ep.prompt_tokens += len(out.prompt_ids)
        ep.cached_tokens += out.num_cached_tokens
        ep.completion_tokens += len(out.token_ids)
        ep.reasoning_tokens += reasoning_ids
        ep.step_token_ids.append(list(out.token_ids))
        ep.last = parsed
        # A heavy job's trajectories start from the same conversation: trajectory 0 records it for all.
        params, first = ep.params, ep.step == 0 and not ep.trajectory
        assert params is not None
        ep.spans.append(
            TraceSpan(
                job_id=ep.spec.job_id,
                trajectory=ep.trajectory,
                step=ep.step,
                span_id=ep.span_id(ep.step, "chat"),
                parent_span_id=None,
                operation="chat" if ep.trajectory is not None else "aggregate",
                start_ns=ep.step_start_ns,
                end_ns=time.time_ns(),
                input_tokens=len(out.prompt_ids),
                cached_input_tokens=out.num_cached_tokens,
                output_tokens=len(out.token_ids),
                output_token_ids=list(out.token_ids),
                reasoning_content=parsed.reasoning,
                content=parsed.content,
                finish_reason="tool_calls" if parsed.tool_calls and out.finish_reason == "stop" else out.finish_reason,
                request_temperature=params.temperature,
                request_top_p=params.top_p,
                request_top_k=params.top_k,
                request_seed=params.seed,
                request_max_tokens=params.max_new_tokens,
                # What the episode started from, once, so the trace alone replays it (k2batch.agent.replay).
                input_messages=_json(ep.spec.messages) if first else None,
                tool_definitions=_json(ep.spec.tool_schemas) if first else None,
                episode_budgets=_json(ep.spec.budgets) if first else None,
                aggregation=ep.record,
            )
        )
        ep.step += 1
        if out.finish_reason == "error":
            return finish(ep, "error", "engine_error", out.error)
        if out.finish_reason == "length":
            return finish(ep, "token_limit", "token_limit", f"step {ep.step - 1} stopped at its token budget")
        if parsed.tool_calls and ep.trajectory is None:
            return finish(ep, "error", "malformed_output", "the aggregation turn called tools; it has none")
        if not parsed.tool_calls:
            # The final turn: an answer that did not parse, or none at all, is not a result to hand on as ok.
            if parsed.errors:
                why = "; ".join(parsed.errors)
                return finish(ep, "error", "malformed_output", f"step {ep.step - 1}: the answer did not parse: {why}")
            if not parsed.content.strip():
                return finish(ep, "error", "empty_answer", f"step {ep.step - 1} ended the episode with no answer")
            return finish(ep, "ok")
        ep.messages.append(assistant_message(parsed))
        ep.tool_results = [None] * len(parsed.tool_calls)
        for position, call in enumerate(parsed.tool_calls):
            # Calls that did not parse still go through the caller: it answers them with a readable error.
            future = pool.submit(
                call_tool, ep.spec.job_id, ep.trajectory or 0, ep.step - 1, call.id, call.name, call.arguments
            )
            ep.pending[future] = (call, position, time.time_ns())
            calls[future] = ep
            ep.tool_call_count += 1

    def on_tools_done(ep: _Episode) -> None:
        before = render(tokenizer, ep.spec, ep.messages, False)
        step = ep.step - 1
        for position, (call, result, start_ns, end_ns) in enumerate(ep.tool_results):  # type: ignore[misc]
            ep.messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result.content})
            ep.spans.append(
                TraceSpan(
                    job_id=ep.spec.job_id,
                    trajectory=ep.trajectory,
                    step=step,
                    span_id=ep.span_id(step, "tool", position),
                    parent_span_id=ep.span_id(step, "chat"),
                    operation="execute_tool",
                    start_ns=start_ns,
                    end_ns=end_ns,
                    tool_call_id=call.id,
                    tool_name=call.name,
                    tool_arguments=call.arguments,
                    tool_result=result.content,
                    error_type=result.error_type,
                )
            )
        after = render(tokenizer, ep.spec, ep.messages, True)
        previous = ep.request_id
        if not after.startswith(before):
            # The template rewrote earlier turns: the new prompt is tokenized whole, and the session still gives
            # it the KV of every token before the first one that changed.
            return submit_step(ep, tokenizer.encode_chat(after), previous)
        prompt_ids = ep.prompt_ids + ep.step_token_ids[-1] + tokenizer.encode_chat(after[len(before) :])
        budgets = ep.spec.budgets
        if len(prompt_ids) + budgets.min_new_tokens > budgets.max_context_tokens and hide_earlier_results(ep):
            # Earlier results became placeholders: only the tokens from the first hidden result on are prefilled.
            return submit_step(ep, tokenizer.encode_chat(render(tokenizer, ep.spec, ep.messages, True)), previous)
        submit_step(ep, prompt_ids, previous)

    def hide_earlier_results(ep: _Episode) -> bool:
        """Replace the tool results of steps before the last one with the placeholder, as K2's own harness does."""
        last_assistant = max(i for i, m in enumerate(ep.messages) if m["role"] == "assistant")
        placeholder = ep.spec.budgets.hidden_tool_result
        hidden = False
        for i, message in enumerate(ep.messages[:last_assistant]):
            if message["role"] == "tool" and message["content"] != placeholder and i >= len(ep.spec.messages):
                ep.messages[i] = {**message, "content": placeholder}
                hidden = True
        return hidden

    with ThreadPoolExecutor(max_workers=max(1, tool_workers), thread_name_prefix="tool") as pool:
        for job in jobs:
            for ep in job.trajectories:  # in order: the first one's prompt blocks serve the others
                guarded(ep, start)
        while open_jobs[0]:
            if engine.has_unfinished():
                running = list(calls)  # the calls of this step's outputs are seen next time round
                for out in engine.step():
                    guarded(by_request.pop(out.request_id), on_output, out)
                done = [f for f in running if f.done()]
            else:
                done = list(wait(list(calls), return_when=FIRST_COMPLETED).done)
            for future in done:
                ep = calls.pop(future)
                guarded(ep, collect, future)
    return [job.outcome for job in jobs]  # type: ignore[misc]


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def registry_caller(
    registry: ToolRegistry,
    contexts: dict[str, ToolContext],
    enabled: dict[str, Sequence[str]],
    *,
    timeout_s: float,
    max_result_chars: int,
) -> ToolCaller:
    """A ToolCaller running each job's calls in its own ToolContext, restricted to the job's tools."""

    def call(job_id: str, trajectory: int, step: int, tool_call_id: str, name: str, arguments: str) -> ToolResult:
        return registry.call(name, arguments, contexts[job_id], timeout_s, max_result_chars, enabled[job_id])

    return call


def recorded_caller(spans: Sequence[TraceSpan]) -> ToolCaller:
    """A ToolCaller answering each call with the result its trace recorded, so a replay sees the same inputs."""
    recorded = {
        (span.trajectory or 0, span.step, span.tool_call_id): ToolResult(span.tool_result or "", span.error_type)
        for span in spans
        if span.operation == "execute_tool"
    }

    def call(job_id: str, trajectory: int, step: int, tool_call_id: str, name: str, arguments: str) -> ToolResult:
        found = recorded.get((trajectory, step, tool_call_id))
        if found is None:
            where = f"step {step}" + (f" of trajectory {trajectory}" if trajectory else "")
            return ToolResult(f"error: the trace has no result for call {tool_call_id} of {where}", "not_recorded")
        return found

    return call
