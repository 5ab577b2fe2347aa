"""Demo jobs (retrieval, draft, synthesis) over the synthetic world, their gold episodes, and answer grading."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from typing import Any

import msgspec

from k2batch.demo.world import COMPANY_SUFFIXES, PROFESSIONS, REGIONS, SECTORS, Entity, World

TASKS = ("retrieval", "draft", "synthesis")
SEARCH_K = 3

# (kind, fact): question, what the fact is called in reasoning, answer sentence.
RETRIEVAL = {
    ("city", "founded"): ("When was {n} founded?", "founding year", "{n} was founded in {v}"),
    ("city", "population"): ("What is the population of {n}?", "population", "{n} has a population of {v}"),
    ("city", "region"): ("In which region is {n}?", "region", "{n} is in the {v} region"),
    ("city", "elevation"): ("What is the elevation of {n}?", "elevation", "{n} lies at an elevation of {v} m"),
    ("company", "founded"): ("When was {n} founded?", "founding year", "{n} was founded in {v}"),
    ("company", "employees"): ("How many employees does {n} have?", "number of employees", "{n} has {v} employees"),
    ("company", "sector"): ("Which sector is {n} in?", "sector", "{n} is in the {v} sector"),
    ("company", "city"): ("Where is {n} based?", "home city", "{n} is based in {v}"),
    ("person", "born"): ("When was {n} born?", "birth year", "{n} was born in {v}"),
    ("person", "patents"): ("How many patents does {n} hold?", "number of patents", "{n} holds {v} patents"),
    ("person", "profession"): ("What does {n} do for a living?", "profession", "{n} works as a {v}"),
    ("person", "city"): ("Where does {n} live?", "home city", "{n} lives in {v}"),
}
PROFILE = {
    "city": "{n} is a city in the {region} region, founded in {founded}, with {population} people at {elevation} m",
    "company": "{n} is a {sector} company based in {city}, founded in {founded}, with {employees} employees",
    "person": "{n} is a {profession} from {city}, born in {born}, with {patents} patents",
}
# kind: (numeric fact compared, its noun in the question and answer)
SYNTHESIS = {
    "city": ("population", "residents"),
    "company": ("employees", "employees"),
    "person": ("patents", "patents"),
}


class DemoJob(msgspec.Struct, frozen=True):
    """One job row of the demo input, with what a correct answer must contain."""

    job_id: str
    task: str
    prompt: str
    tools: list[str]
    expected: dict[str, Any]
    entities: list[str]


def check_tasks(tasks: tuple[str, ...]) -> None:
    """ValueError unless `tasks` is a non-empty sequence of demo task kinds."""
    if not tasks or not set(tasks) <= set(TASKS):
        raise ValueError(f"tasks must be a non-empty sequence of {', '.join(TASKS)}, got {tasks!r}")


def make_jobs(
    world: World,
    count: int,
    seed: int,
    *,
    held_out: bool,
    prefix: str = "job",
    tasks: tuple[str, ...] = TASKS,
    balanced_lengths: float = 0.0,
) -> list[DemoJob]:
    """`count` jobs over held-out entities (evaluation, the demo) or training ones, the kinds of `tasks` in turn
    (a kind listed twice gets twice the jobs).

    A `balanced_lengths` fraction of the synthesis jobs compares two values whose digit counts are drawn
    uniformly from those the pool has, not as the world draws them: pairs like 4 against 211 patents are rare in
    the world, and copying the longer number after the shorter one is what a small model gets wrong. 0 (the
    default) keeps the world's own distribution and draws exactly the jobs it always has."""
    check_tasks(tasks)
    if not 0.0 <= balanced_lengths <= 1.0:
        raise ValueError(f"balanced_lengths must be in [0, 1], got {balanced_lengths}")
    rng = random.Random(seed)
    pool = world.split(held_out)
    by_kind = {kind: [e for e in pool if e.kind == kind] for kind in SYNTHESIS}
    by_length = (
        {kind: _by_digits(entities, SYNTHESIS[kind][0]) for kind, entities in by_kind.items()}
        if balanced_lengths
        else {}
    )
    jobs = []
    for i in range(count):
        task = tasks[i % len(tasks)]
        job_id = f"{prefix}-{i:05d}"
        if task == "synthesis":
            kind = rng.choice(sorted(by_kind))
            fact, noun = SYNTHESIS[kind]
            balanced = bool(balanced_lengths) and rng.random() < balanced_lengths
            while True:
                if balanced:
                    groups = by_length[kind]
                    a, b = (rng.choice(groups[rng.choice(sorted(groups))]) for _ in range(2))
                else:
                    a, b = rng.sample(by_kind[kind], 2)
                if a.facts[fact] != b.facts[fact]:
                    break
            first, second = int(a.facts[fact]), int(b.facts[fact])
            winner = a if first > second else b
            jobs.append(
                DemoJob(
                    job_id,
                    task,
                    f"Which of {a.name} and {b.name} has more {noun}, and by how many?",
                    ["search", "calculator"],
                    {"winner": winner.name, "difference": str(abs(first - second)), "doc_ids": [a.doc_id, b.doc_id]},
                    [a.name, b.name],
                )
            )
            continue
        entity = rng.choice(pool)
        if task == "retrieval":
            fact = rng.choice([f for (k, f) in RETRIEVAL if k == entity.kind])
            question = RETRIEVAL[(entity.kind, fact)][0].format(n=entity.name)
            expected = {"fact": fact, "values": [entity.facts[fact]], "doc_ids": [entity.doc_id]}
        else:
            question = f"Write a one-line profile of {entity.name}."
            expected = {"values": list(entity.facts.values()), "doc_ids": [entity.doc_id]}
        jobs.append(DemoJob(job_id, task, question, ["search"], expected, [entity.name]))
    return jobs


def _by_digits(entities: list[Entity], fact: str) -> dict[int, list[Entity]]:
    groups: dict[int, list[Entity]] = {}
    for e in entities:
        groups.setdefault(len(e.facts[fact]), []).append(e)
    return groups


def job_rows(jobs: list[DemoJob]) -> dict[str, list]:
    """Columns of the input Parquet; `expected` and `entities` pass through to the results for grading."""
    return {
        "job_id": [j.job_id for j in jobs],
        "task": [j.task for j in jobs],
        "prompt": [j.prompt for j in jobs],
        "tools": [j.tools for j in jobs],
        "expected": [json.dumps(j.expected) for j in jobs],
        "entities": [j.entities for j in jobs],
    }


# ---- gold episodes -------------------------------------------------------------------------------------------

# call_tool(name, arguments_json) -> the tool's result text, from the real tools.
ToolRunner = Callable[[str, str], str]


def _call(index: int, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"functions.{name}:{index}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


def _assistant(reasoning: str, content: str = "", calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    if calls:
        message["tool_calls"] = calls
    return message


def _run_calls(calls: list[dict[str, Any]], run_tool: ToolRunner) -> list[dict[str, Any]]:
    return [
        {
            "role": "tool",
            "tool_call_id": c["id"],
            "name": c["function"]["name"],
            "content": run_tool(c["function"]["name"], c["function"]["arguments"]),
        }
        for c in calls
    ]


def _search_args(name: str) -> dict[str, Any]:
    return {"query": name, "k": SEARCH_K}


def misspell(name: str, rng: random.Random) -> str:
    """`name` as a small model miscopies it: one word (a company's suffix aside) with its last letters written
    twice ("Desdor" -> "Desdordor"), two or three inner letters dropped ("Ralolis" -> "Ralis"), or an inner
    chunk written twice; never `name` itself."""
    words = name.split()
    i = rng.randrange(len(words) - 1) if words[-1] in COMPANY_SUFFIXES else rng.randrange(len(words))
    word = words[i].lower()
    size = rng.randint(2, 3)
    how = rng.choice(("tail", "drop", "inner")) if len(word) > size + 1 else "tail"
    if how == "tail":
        wrong = word + word[-size:]
    else:
        at = rng.randrange(1, len(word) - size)
        wrong = word[:at] + word[at + size :] if how == "drop" else word[: at + size] + word[at:]
    words[i] = wrong.capitalize()
    return " ".join(words)


def _retry(name: str, wrong: str, result: str, index: int) -> dict[str, Any]:
    """The turn after a search for a miscopied name that missed the entity: say so, search for the right name."""
    seen = (
        f"The search for {wrong} found nothing."
        if result.startswith("no results")
        else (f"The results for {wrong} are not about {name}.")
    )
    return _assistant(
        f"{seen} The question names {name}. I will search the corpus for {name}.",
        calls=[_call(index, "search", _search_args(name))],
    )


def gold_episode(
    job: DemoJob, world: World, run_tool: ToolRunner, typo: tuple[str, str] | None = None
) -> list[dict[str, Any]] | None:
    """The messages after the user turn that a perfect agent produces, tool results from `run_tool`.

    With `typo` = (name, wrong), the episode starts from a mistake: the first turn searches for `wrong` (a
    miscopy of the entity `name`, `misspell`). That turn is marked `"mistake": True` (context, not a target to
    learn); if its search misses the entity's document, the next turn says so and searches for `name`, the
    recovery a model needs when it miscopies a name. None when the search does not return the entity's document
    (then no answer can cite it)."""
    entities = {e.name: e for e in world.entities}
    found = [entities[name] for name in job.entities]
    if typo is not None and typo[0] not in job.entities:
        raise ValueError(f"typo {typo!r} names no entity of job {job.job_id}")
    asked = {name: (typo[1] if typo and name == typo[0] else name) for name in job.entities}
    mistake = {"mistake": True} if typo else {}
    if job.task == "synthesis":
        a, b = found
        fact, noun = SYNTHESIS[a.kind]
        phrase = {"population": "population", "employees": "number of employees", "patents": "number of patents"}[fact]
        calls = [_call(0, "search", _search_args(asked[a.name])), _call(1, "search", _search_args(asked[b.name]))]
        step1 = (
            _assistant(
                f"I need the {phrase} of {asked[a.name]} and of {asked[b.name]}. I will search for both.", calls=calls
            )
            | mistake
        )
        results1 = _run_calls(calls, run_tool)
        steps = [step1, *results1]
        next_call = 2
        if typo:
            missed = [(e, r) for e, r in zip(found, results1, strict=True) if e.doc_id not in r["content"]]
            if len(missed) == 1 and missed[0][0].name == typo[0]:
                retry = _retry(typo[0], typo[1], missed[0][1]["content"], next_call)
                again = _run_calls(retry["tool_calls"], run_tool)
                results1 = [again[0] if e.name == typo[0] else r for e, r in zip(found, results1, strict=True)]
                steps += [retry, *again]
                next_call += 1
        if any(e.doc_id not in r["content"] for e, r in zip(found, results1, strict=True)):
            return None
        va, vb = a.facts[fact], b.facts[fact]
        calc = [_call(next_call, "calculator", {"expression": f"{va} - {vb}"})]
        step2 = _assistant(
            f"{a.doc_id} gives the {phrase} of {a.name}: {va}. {b.doc_id} gives the {phrase} of {b.name}: {vb}. "
            f"I will subtract the second from the first.",
            calls=calc,
        )
        results2 = _run_calls(calc, run_tool)
        diff = results2[0]["content"]
        winner, loser = (a, b) if not diff.startswith("-") else (b, a)
        sign = "positive" if winner is a else "negative"
        final = _assistant(
            f"The difference is {diff}, which is {sign}, so {winner.name} has more.",
            f"{winner.name} has more {noun} than {loser.name}, by {diff.lstrip('-')} "
            f"[{winner.doc_id}, {loser.doc_id}].",
        )
        return [*steps, step2, *results2, final]

    (entity,) = found
    query = asked[entity.name]
    calls = [_call(0, "search", _search_args(query))]
    if job.task == "retrieval":
        fact = job.expected["fact"]
        _, phrase, sentence = RETRIEVAL[(entity.kind, fact)]
        step1 = _assistant(
            f"The user wants the {phrase} of {query}. I will search the corpus for {query}.", calls=calls
        )
        reading = f"{entity.doc_id} is about {entity.name}. It gives the {phrase}: {entity.facts[fact]}."
        answer = sentence.format(n=entity.name, v=entity.facts[fact])
    else:
        step1 = _assistant(
            f"I need the facts about {query} for a profile. I will search the corpus for {query}.", calls=calls
        )
        reading = f"{entity.doc_id} is about {entity.name}. It has all the facts for the profile."
        answer = PROFILE[entity.kind].format(n=entity.name, **entity.facts)
    results = _run_calls(calls, run_tool)
    steps = [step1 | mistake, *results]
    if typo and entity.doc_id not in results[0]["content"]:
        retry = _retry(entity.name, query, results[0]["content"], 1)
        results = _run_calls(retry["tool_calls"], run_tool)
        steps += [retry, *results]
    if entity.doc_id not in results[0]["content"]:
        return None
    return [*steps, _assistant(reading, f"{answer} [{entity.doc_id}].")]


# ---- grading -------------------------------------------------------------------------------------------------


def _contains(text: str, value: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(value)}(?![\w])", text) is not None


def grade(task: str, expected: dict[str, Any], answer: str | None) -> bool:
    """Whether an answer holds the expected facts and cites the documents they come from."""
    if not answer:
        return False
    if not all(_contains(answer, d) for d in expected["doc_ids"]):
        return False
    if task == "synthesis":
        return answer.startswith(expected["winner"] + " has more") and _contains(answer, expected["difference"])
    return all(_contains(answer, v) for v in expected["values"])


# The facts an answer states: document ids, numbers, categories (longest first: "south coast" before a shorter
# one), and names (every capitalized word: the answer templates capitalize nothing else). A region is any pairing
# of the regions' words: a model can write "west plateau", which no document holds.
_REGION_PAIRS = {f"{a} {b}" for a in {r.split()[0] for r in REGIONS} for b in {r.split()[1] for r in REGIONS}}
_CATEGORIES = sorted({*_REGION_PAIRS, *SECTORS, *PROFESSIONS}, key=len, reverse=True)
FACT = re.compile(r"doc-\d{4}|\d+|" + "".join(rf"\b{re.escape(c)}\b|" for c in _CATEGORIES) + r"\b[A-Z][a-z]+\b")


def traceable(answer: str | None, tool_results: list[str]) -> bool:
    """Every document id, number, category (region, sector, profession) and name of the answer appears in one of
    the episode's tool results. Traceable is not correct: a region or name copied from the wrong search hit is
    traceable, and `grade` fails it."""
    if not answer:
        return False
    seen = "\n".join(tool_results)
    # A difference the calculator returned as -36 is the 36 of the answer.
    return all(re.search(rf"(?<![\w]){re.escape(fact)}(?![\w])", seen) for fact in FACT.findall(answer))
