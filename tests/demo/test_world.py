"""The synthetic world, its jobs and gold episodes: deterministic from a seed, in the engine's exact chat format."""

from __future__ import annotations

import json
import re

from demo_episodes import assistant_text, episode_pieces, initial_messages, tool_runner, training_pieces

from k2batch.agent.tools import TOOLS
from k2batch.config import load_config
from k2batch.demo.tasks import TASKS, gold_episode, grade, job_rows, make_jobs, traceable
from k2batch.demo.world import corpus_table, make_world
from k2batch.tokenizer import parse_assistant, render_chat


def test_world_and_jobs_are_deterministic_from_the_seed(world):
    again = make_world(seed=3, num_cities=40, num_companies=60, num_people=60)
    assert again == world
    assert make_world(seed=4, num_cities=40, num_companies=60, num_people=60) != world
    assert corpus_table(again).equals(corpus_table(world))
    assert make_jobs(world, 12, seed=5, held_out=True) == make_jobs(world, 12, seed=5, held_out=True)
    assert make_jobs(world, 12, seed=5, held_out=True) != make_jobs(world, 12, seed=6, held_out=True)


def test_held_out_jobs_use_only_held_out_entities(world):
    names = [e.name for e in world.entities]
    assert len(set(names)) == len(names)
    held_out = make_jobs(world, 60, seed=0, held_out=True)
    training = make_jobs(world, 60, seed=0, held_out=False)
    assert all(name in world.held_out for job in held_out for name in job.entities)
    assert not any(name in world.held_out for job in training for name in job.entities)
    assert [j.task for j in held_out[:3]] == list(TASKS)
    rows = job_rows(held_out)
    assert set(rows) >= {"job_id", "task", "prompt", "tools"} and len(rows["job_id"]) == 60


def test_the_training_mix_weights_tasks_and_balances_the_digit_counts_synthesis_compares():
    """A task listed twice gets twice the jobs; balanced synthesis jobs meet values two or more digits apart (4
    against 211 patents) far more often than the world's own draws, which stay exactly as they were at 0."""
    from collections import Counter

    from k2batch.demo.tasks import SYNTHESIS

    world = make_world(seed=3, held_out_fraction=0.0)
    entities = {e.name: e for e in world.entities}
    mix = ("retrieval", "draft", "synthesis", "synthesis")

    def lengths(jobs):
        out = Counter()
        for job in jobs:
            if job.task == "synthesis":
                a, b = (entities[n] for n in job.entities)
                fact = SYNTHESIS[a.kind][0]
                out[(a.kind, len(a.facts[fact]), len(b.facts[fact]))] += 1
        return out

    natural = make_jobs(world, 2400, seed=0, held_out=False, tasks=mix)
    balanced = make_jobs(world, 2400, seed=0, held_out=False, tasks=mix, balanced_lengths=0.5)
    assert Counter(j.task for j in balanced) == {"synthesis": 1200, "retrieval": 600, "draft": 600}
    assert make_jobs(world, 30, seed=0, held_out=False) == make_jobs(world, 30, seed=0, held_out=False, tasks=TASKS)
    far_apart = lambda counts: sum(n for (_, la, lb), n in counts.items() if abs(la - lb) >= 2)  # noqa: E731
    assert far_apart(lengths(balanced)) >= 3 * max(1, far_apart(lengths(natural)))
    for job in balanced:
        if job.task == "synthesis":
            a, b = (entities[n] for n in job.entities)
            fact = SYNTHESIS[a.kind][0]
            assert a.facts[fact] != b.facts[fact]
            assert job.expected["difference"] == str(abs(int(a.facts[fact]) - int(b.facts[fact])))


def _echoed(word: str) -> bool:
    """Whether some split of `word` into syllables has two in a row that repeat or share a boundary letter."""
    from functools import cache

    from k2batch.demo.world import SYLLABLES

    @cache
    def splits(rest: str) -> list[tuple[str, ...]]:
        if not rest:
            return [()]
        return [(s, *tail) for s in SYLLABLES if rest.startswith(s) for tail in splits(rest[len(s) :])]

    return any(any(b == a or b[0] in (a[0], a[-1]) for a, b in zip(p, p[1:])) for p in splits(word.lower()))


def test_echo_names_make_the_names_a_small_model_miscopies_common_and_leave_the_default_world_alone():
    """Ralolis, Nellistor, Finmimi: about 15% of the world's name words echo a syllable; echo_names=1 makes every
    word do so, 0.3 about a third. The names stay unique and share no word, and the default draws the same world."""
    from k2batch.demo.world import name_words

    assert make_world(seed=5, echo_names=0.0) == make_world(seed=5)
    share = {}
    for echo in (0.0, 0.3, 1.0):
        world = make_world(seed=5, held_out_fraction=0.0, echo_names=echo)
        words = name_words(world)
        names = [e.name for e in world.entities]
        assert len(set(names)) == len(names) == 2100
        assert len(words) == 300 + 900 + 2 * 900  # one word a city and company, two a person: none shared
        share[echo] = sum(map(_echoed, words)) / len(words)
    assert share[1.0] == 1.0
    assert 0.10 < share[0.0] < 0.20 and share[0.3] > share[0.0] + 0.12
    assert all(_echoed(n) for n in ("Ralolis", "Nellistor", "Finmimi", "Vexrosros"))
    import pytest

    with pytest.raises(ValueError, match="echo_names must be in"):
        make_world(echo_names=1.5)


def test_make_jobs_rejects_an_unknown_task_or_a_fraction_outside_0_1(world):
    import pytest

    with pytest.raises(ValueError, match="tasks must be"):
        make_jobs(world, 3, seed=0, held_out=False, tasks=("retrieval", "summary"))
    with pytest.raises(ValueError, match="balanced_lengths"):
        make_jobs(world, 3, seed=0, held_out=False, balanced_lengths=1.5)


def test_gold_episodes_think_before_every_call_and_answer_with_real_tool_results(world, corpus):
    config = load_config()
    run_tool = tool_runner(config, corpus)
    for job in make_jobs(world, 9, seed=2, held_out=False):
        steps = gold_episode(job, world, run_tool)
        assistants = [m for m in steps if m["role"] == "assistant"]
        assert all(m["reasoning_content"] for m in assistants)
        assert len(assistants) == (3 if job.task == "synthesis" else 2)
        for message in steps:
            if message["role"] == "tool":
                call = next(
                    c for m in assistants for c in m.get("tool_calls", []) if c["id"] == message["tool_call_id"]
                )
                assert message["content"] == run_tool(call["function"]["name"], call["function"]["arguments"])
        answer = assistants[-1]["content"]
        assert grade(job.task, job.expected, answer)
        assert traceable(answer, [m["content"] for m in steps if m["role"] == "tool"])
        assert not grade(job.task, job.expected, answer.replace(job.expected["doc_ids"][0], "doc-9999"))


def test_episode_pieces_are_what_the_episode_loop_renders_and_parses(world, corpus):
    config = load_config()
    job = next(j for j in make_jobs(world, 3, seed=2, held_out=False) if j.task == "synthesis")
    steps = gold_episode(job, world, tool_runner(config, corpus))
    tools = TOOLS.schemas(job.tools)
    initial = initial_messages(job, config)
    pieces = episode_pieces(None, tools, initial, steps)
    assert [generated for _, generated in pieces] == [False, True, False, True, False, True]
    # The whole episode is the template's rendering of the unfinished conversation plus the last turn.
    last = len(steps) - 1
    unfinished = render_chat(None, initial + steps[:last], tools, add_generation_prompt=True)
    assert "".join(text for text, _ in pieces) == unfinished + assistant_text(steps[last])
    for (text, generated), message in zip(pieces[1::2], [m for m in steps if m["role"] == "assistant"], strict=True):
        parsed = parse_assistant(text, set(job.tools))
        assert generated and not parsed.errors
        assert parsed.reasoning == message["reasoning_content"] and parsed.content == message["content"]
        assert [c.arguments for c in parsed.tool_calls] == [
            c["function"]["arguments"] for c in message.get("tool_calls", [])
        ]
    assert json.loads(parse_assistant(pieces[3][0]).tool_calls[0].arguments)["expression"].count("-") >= 1


def test_fresh_training_worlds_never_meet_the_demo_worlds_names(tmp_path):
    """Training episodes over fresh worlds: real searches over their own corpora, and not one name word of the
    demo world (whose held-out entities evaluation uses) in any of them."""
    from train_demo import build_data

    from k2batch.demo.world import name_words

    demo = make_world()
    reserved = name_words(demo)
    fresh = make_world(11, num_cities=40, num_companies=60, num_people=60, reserved=reserved)
    assert not name_words(fresh) & reserved
    assert make_world(11, num_cities=40, num_companies=60, num_people=60) != fresh

    episodes = build_data(24, seed=0, fresh_worlds=2, work_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh-0-0.parquet", "fresh-0-1.parquet"]
    assert len(episodes) >= 20  # a job whose search misses its document has no gold episode
    text = "".join(piece for pieces in episodes for piece, _ in pieces)
    assert "Return of functions.search" in text and "Return of functions.calculator" in text
    assert not any(word in reserved for word in re.findall(r"[A-Z][a-z]+", text))
    assert not any(re.search(rf"\b{re.escape(name)}\b", text) for name in demo.held_out)


def test_build_data_gives_echo_names_and_digits_to_the_fresh_worlds_only(tmp_path):
    import polars as pl
    import pytest
    from train_demo import build_data

    from k2batch.demo.world import COMPANY_SUFFIXES

    for option in ("echo_names", "echo_digits"):
        with pytest.raises(ValueError, match="echo_names and echo_digits need fresh_worlds"):
            build_data(3, seed=0, fresh_worlds=0, **{option: 0.5})
    episodes = build_data(3, seed=0, fresh_worlds=1, work_dir=tmp_path, echo_names=1.0, echo_digits=1.0)
    assert episodes
    corpus = pl.read_parquet(tmp_path / "fresh-0-0.parquet")
    assert all(_echoed(w) for t in corpus["title"] for w in t.split() if w not in COMPANY_SUFFIXES)
    numbers = [n for text in corpus["text"] for n in re.findall(r"\b\d{2,}\b", text)]
    assert sum(map(_echoed_digits, numbers)) > 0.75 * len(numbers)  # some echoes would leave the range


def test_traceable_needs_every_number_doc_id_category_and_name_in_a_tool_result():
    results = [
        "[doc-0171] Juntur\nJuntur is a city in the north coast region. It was founded in 1805. "
        "Population: 281633. Elevation: 695 m.",
        "-36",
    ]
    good = "Juntur is a city in the north coast region, founded in 1805, with 281633 people at 695 m [doc-0171]."
    assert traceable(good, results)
    assert traceable("Juntur has 36 more", results)  # the calculator's -36 is the answer's 36
    for wrong in (
        good.replace("north coast", "south coast"),
        good.replace("north coast", "west coast"),
        good.replace("north coast", "high valley"),
        good.replace("Juntur", "Junturtur", 1),
        good.replace("1805", "1850"),
        good.replace("doc-0171", "doc-0117"),
    ):
        assert not traceable(wrong, results), wrong
    assert not traceable(None, results) and not traceable("", results)


def _echoed_digits(number: str) -> bool:
    """Whether a chunk of one to three digits is written twice in a row (588989, 1616, 747000)."""
    return re.search(r"(\d{1,3})\1", number) is not None


def test_echo_digits_repeat_a_chunk_of_digits_in_range_and_leave_the_default_world_alone():
    """588989, 747000, 1616: an echo_digits fraction of the numbers writes a chunk of digits again right after
    itself, keeping the digit count and the fact's range; 0 draws the same world as before."""
    import random

    import pytest

    from k2batch.demo.world import _echo_digits

    assert make_world(seed=5, echo_digits=0.0) == make_world(seed=5)
    share = {}
    for echo in (0.0, 0.5):
        world = make_world(seed=5, held_out_fraction=0.0, echo_digits=echo)
        numbers = [v for e in world.entities for v in e.facts.values() if v.isdigit() and len(v) >= 2]
        share[echo] = sum(map(_echoed_digits, numbers)) / len(numbers)
        for e in world.entities:
            f = e.facts
            if e.kind == "city":
                assert 2_000 <= int(f["population"]) < 900_000 and 1100 <= int(f["founded"]) < 1900
    assert share[0.5] > share[0.0] + 0.2  # about 28% of drawn numbers echo by chance (1616, 44)
    rng = random.Random(0)
    for value in (588_139, 74_702, 1_627, 35, 9):
        echoed = _echo_digits(rng, value, 0, 10**7)
        assert len(str(echoed)) == len(str(value))
        assert echoed == value if value < 10 else _echoed_digits(str(echoed))
    assert _echo_digits(random.Random(0), 399, 0, 400) in range(400)  # never leaves [low, high)
    with pytest.raises(ValueError, match="echo_digits must be in"):
        make_world(echo_digits=-0.5)


def test_misspell_miscopies_one_word_of_a_name_and_never_a_company_suffix():
    import random

    from k2batch.demo.tasks import misspell

    rng = random.Random(1)
    for name in ("Desdor", "Ralolis", "Nellozor Perulvex", "Desdor Labs", "Ka"):
        for _ in range(30):
            wrong = misspell(name, rng)
            words, typed = name.split(), wrong.split()
            assert wrong != name and len(typed) == len(words)
            assert sum(a != b for a, b in zip(words, typed, strict=True)) == 1
            assert typed[-1] == words[-1] or name != "Desdor Labs"
            assert all(w[0].isupper() and w[1:].islower() for w in typed)


def _typo_job(world, task, kind):
    """A training job of `task` over an entity of `kind` (for synthesis: the first of the pair)."""
    by_name = {e.name: e for e in world.entities}
    return next(
        j
        for j in make_jobs(world, 300, seed=4, held_out=False)
        if j.task == task and by_name[j.entities[0]].kind == kind
    )


def test_a_typo_episode_learns_the_recovery_not_the_mistake(world, corpus):
    """The first turn searches for a miscopied name: no loss on it. A city's misspelled name finds nothing, a
    company's finds other companies ("Labs"); either way the next turn says so and searches for the question's
    name, and the episode goes on to the same correct, traceable answer."""
    import pytest

    config = load_config()
    run_tool = tool_runner(config, corpus)
    for task, kind, seen in (
        ("retrieval", "city", "found nothing"),
        ("draft", "company", "are not about"),
        ("synthesis", "city", "found nothing"),
    ):
        job = _typo_job(world, task, kind)
        name = job.entities[0]
        wrong = name.split()[0] + "dordor" + "".join(" " + w for w in name.split()[1:])
        steps = gold_episode(job, world, run_tool, (name, wrong))
        assistants = [m for m in steps if m["role"] == "assistant"]
        assert [bool(m.get("mistake")) for m in assistants] == [True] + [False] * (len(assistants) - 1)
        assert wrong in assistants[0]["reasoning_content"]
        assert not re.search(rf"\b{name}\b", assistants[0]["reasoning_content"])
        first_calls = [json.loads(c["function"]["arguments"])["query"] for c in assistants[0]["tool_calls"]]
        assert wrong in first_calls
        retry = assistants[1]
        assert seen in retry["reasoning_content"] and f"The question names {name}." in retry["reasoning_content"]
        assert [json.loads(c["function"]["arguments"])["query"] for c in retry["tool_calls"]] == [name]
        ids = [c["id"] for m in assistants for c in m.get("tool_calls", [])]
        assert ids == [
            f"functions.{c['function']['name']}:{i}"
            for i, c in enumerate(c for m in assistants for c in m.get("tool_calls", []))
        ]
        answer = assistants[-1]["content"]
        assert grade(job.task, job.expected, answer)
        assert traceable(answer, [m["content"] for m in steps if m["role"] == "tool"])
        pieces = episode_pieces(None, TOOLS.schemas(job.tools), initial_messages(job, config), steps)
        generated = [g for _, g in pieces]
        assert generated[:2] == [False, False] and generated.count(True) == len(assistants) - 1
        # The typo's turn is still in the rendered conversation the later turns are trained on.
        assert wrong in "".join(text for text, _ in pieces)
    # A person's misspelled word leaves the other word to find the document: the episode reads it, no retry.
    job = _typo_job(world, "retrieval", "person")
    first, last = job.entities[0].split()
    steps = gold_episode(job, world, run_tool, (job.entities[0], f"{first} {last}{last[-2:]}"))
    assert [bool(m.get("mistake")) for m in steps if m["role"] == "assistant"] == [True, False]
    assert grade(job.task, job.expected, steps[-1]["content"])
    with pytest.raises(ValueError, match="names no entity"):
        gold_episode(job, world, run_tool, ("Nobody", "Nobbody"))


def test_training_pieces_start_a_typos_fraction_of_episodes_from_a_mistake(world, corpus):
    import pytest

    config = load_config()
    jobs = make_jobs(world, 60, seed=1, held_out=False)
    plain = training_pieces(jobs, world, config, corpus, None)
    assert training_pieces(jobs, world, config, corpus, None, typos=0.0, seed=9) == plain
    typed = training_pieces(jobs, world, config, corpus, None, typos=0.5, seed=9)
    assert typed == training_pieces(jobs, world, config, corpus, None, typos=0.5, seed=9)
    # A mistake turn is an assistant turn without loss: the second piece of its episode is not generated.
    mistakes = sum(not pieces[1][1] for pieces in typed)
    assert 15 <= mistakes <= 45 and all(pieces[1][1] for pieces in plain)
    with pytest.raises(ValueError, match="typos must be in"):
        training_pieces(jobs, world, config, corpus, None, typos=2.0)
