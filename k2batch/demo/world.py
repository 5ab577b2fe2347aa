"""A synthetic world of invented companies, cities and people, and its search corpus (deterministic from a seed)."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ra",
    "ven",
    "dor",
    "sil",
    "tam",
    "qu",
    "bre",
    "zan",
    "fel",
    "gor",
    "hal",
    "jun",
    "lis",
    "mor",
    "nel",
    "pra",
    "sto",
    "tur",
    "vex",
    "wyn",
    "zor",
    "cal",
    "des",
    "fin",
    "gal",
    "kel",
    "mar",
    "nov",
    "per",
    "ros",
    "sel",
    "tor",
    "ul",
    "var",
    "yen",
    "bal",
    "cor",
]
COMPANY_SUFFIXES = ["Labs", "Group", "Works", "Systems", "Industries", "Holdings"]
SECTORS = ["robotics", "textiles", "shipping", "software", "mining", "banking", "farming", "media"]
REGIONS = ["north coast", "south coast", "east valley", "west hills", "central plain", "high plateau"]
PROFESSIONS = ["engineer", "painter", "chemist", "architect", "pilot", "teacher", "composer", "surgeon"]


class Entity(msgspec.Struct, frozen=True):
    """One invented thing with its facts; `doc_id` names the corpus document about it."""

    doc_id: str
    kind: str  # company | city | person
    name: str
    facts: dict[str, str]


class World(msgspec.Struct, frozen=True):
    entities: list[Entity]
    held_out: frozenset[str]
    """Names of entities that training never sees: evaluation jobs use only these."""

    def split(self, held_out: bool) -> list[Entity]:
        return [e for e in self.entities if (e.name in self.held_out) == held_out]


def _word(rng: random.Random, syllables: int, echo: float = 0.0) -> str:
    parts = [rng.choice(SYLLABLES) for _ in range(syllables)]
    if echo and rng.random() < echo:
        # An echo: a syllable repeated ("Finmimi"), or one that starts with the letter the one before starts or
        # ends with ("Ralolis", "Nellistor"). Copying such a name, a small model's induction jumps to the second
        # occurrence and drops or swaps a syllable ("Ralis"). No draw at all when `echo` is 0.
        i = rng.randrange(1, syllables)
        before = parts[i - 1]
        echoes = [s for s in SYLLABLES if s != before and s[0] in (before[0], before[-1])]
        parts[i] = before if rng.random() < 0.5 else rng.choice(echoes)
    return "".join(parts).capitalize()


def _echo_digits(rng: random.Random, value: int, low: int, high: int) -> int:
    """`value` with a chunk of one to three digits written again right after itself, two or three times for a
    single digit (588989, 747000, 1616): the numbers a small model's induction shortens or runs on (5889,
    7470000). The digit count stays; `value` itself if the echo leaves [low, high)."""
    digits = str(value)
    n = len(digits)
    if n < 2:
        return value
    size = rng.randint(1, min(3, n // 2))
    times = 3 if size == 1 and n >= 3 and rng.random() < 0.5 else 2
    start = rng.randrange(n - times * size + 1)
    chunk = digits[start : start + size]
    echoed = int(digits[:start] + chunk * times + digits[start + times * size :])
    return echoed if low <= echoed < high else value  # same length and leading digit by construction


def make_world(
    seed: int = 0,
    num_cities: int = 300,
    num_companies: int = 900,
    num_people: int = 900,
    held_out_fraction: float = 0.15,
    reserved: frozenset[str] = frozenset(),
    echo_names: float = 0.0,
    echo_digits: float = 0.0,
) -> World:
    """Invented entities with unique names; every fact is drawn from `seed` alone. No name uses a word of
    `reserved` (the demo world's name words, for a training world that must not meet its held-out entities).
    An `echo_names` fraction of name words repeats a syllable or a letter at a syllable boundary (`_word`), the
    names a small model miscopies, and an `echo_digits` fraction of numbers repeats a chunk of digits
    (`_echo_digits`: 588989); at 0 (the defaults, and the demo world) it draws exactly the world it always has."""
    for option, fraction in (("echo_names", echo_names), ("echo_digits", echo_digits)):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{option} must be in [0, 1], got {fraction}")
    rng = random.Random(seed)

    def number(low: int, high: int) -> int:
        value = rng.randrange(low, high)
        if echo_digits and rng.random() < echo_digits:  # no draw at all when 0
            value = _echo_digits(rng, value, low, high)
        return value

    used: set[str] = set(reserved)

    def unique(make) -> str:
        while True:
            name = make()
            # Names must not share a word with another entity, or a search for one would rank the other first.
            if name not in used and not any(w in used for w in name.split()):
                used.add(name)
                used.update(w for w in name.split() if w not in COMPANY_SUFFIXES)
                return name

    def word() -> str:
        return _word(rng, rng.choice((2, 3)), echo_names)

    cities = [unique(word) for _ in range(num_cities)]
    entities: list[Entity] = []

    def add(kind: str, name: str, facts: dict[str, object]) -> None:
        entities.append(Entity(f"doc-{len(entities):04d}", kind, name, {k: str(v) for k, v in facts.items()}))

    for name in cities:
        add(
            "city",
            name,
            {
                "region": rng.choice(REGIONS),
                "population": number(2_000, 900_000),
                "founded": number(1100, 1900),
                "elevation": number(5, 2500),
            },
        )
    for _ in range(num_companies):
        name = unique(lambda: f"{word()} {rng.choice(COMPANY_SUFFIXES)}")
        add(
            "company",
            name,
            {
                "sector": rng.choice(SECTORS),
                "city": rng.choice(cities),
                "founded": number(1850, 2021),
                "employees": number(20, 20_000),
            },
        )
    for _ in range(num_people):
        name = unique(lambda: f"{word()} {word()}")
        add(
            "person",
            name,
            {
                "profession": rng.choice(PROFESSIONS),
                "city": rng.choice(cities),
                "born": number(1940, 2004),
                "patents": number(0, 400),
            },
        )
    order = list(range(len(entities)))
    rng.shuffle(order)
    held_out = frozenset(entities[i].name for i in order[: int(len(entities) * held_out_fraction)])
    return World(entities, held_out)


def name_words(world: World) -> frozenset[str]:
    """The words of the world's names (company suffixes aside): what another world passes as `reserved`."""
    return frozenset(w for e in world.entities for w in e.name.split() if w not in COMPANY_SUFFIXES)


def document(entity: Entity) -> str:
    """The corpus text about an entity: the only place its facts are written down."""
    f, n = entity.facts, entity.name
    if entity.kind == "city":
        return (
            f"{n} is a city in the {f['region']} region. It was founded in {f['founded']}. "
            f"Population: {f['population']}. Elevation: {f['elevation']} m."
        )
    if entity.kind == "company":
        return (
            f"{n} is a {f['sector']} company based in {f['city']}. It was founded in {f['founded']}. "
            f"Employees: {f['employees']}."
        )
    return f"{n} is a {f['profession']} who lives in {f['city']}. Born in {f['born']}. Patents: {f['patents']}."


def corpus_table(world: World) -> pa.Table:
    """The search tool's corpus: doc_id, title, text."""
    return pa.table(
        {
            "doc_id": [e.doc_id for e in world.entities],
            "title": [e.name for e in world.entities],
            "text": [document(e) for e in world.entities],
        }
    )


def write_corpus(world: World, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(corpus_table(world), path)
    return path
