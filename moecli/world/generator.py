"""A deterministic, seeded fact world: typed entities, relations, phrasing templates, edit sets.

Why a generated world: no model can be downloaded here, yet a user trying moecli must see an
edit work (and fail to leak) before pointing it at a 7B model. The world gives a small model
facts to learn (`World.facts()`), and gives the editing methods a benchmark whose every record
has rephrases, locality pairs of two kinds and, where the world defines one, a one-hop
portability pair (`World.edit_records()`).

Design rules (what the edit set relies on):
- Every subject has at least two relations, and one of them is *reserved*: it is never edited.
  The reserved relation rotates over the subjects, so every relation has both edited and reserved
  subjects. Locality pairs are only ever reserved facts, so no edit of an exported set can
  legitimately change another record's locality answer, whatever prefix of the set one edits.
- Edit targets of a relation that has a one-hop consequence are drawn from objects whose own
  next-hop fact is reserved, so the portability answer holds in the edited world too, and from
  objects whose next hop differs from the old one, so portability is informative.
- Everything is drawn from `random.Random(seed)` streams named per purpose; nothing depends on
  Python's hash randomisation or set ordering.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from moecli.data.records import EditRecord, LocalityPair, PortabilityPair

GENERATOR_VERSION = 1

# fmt: off
FIRST_NAMES = """Alice Bruno Clara Daniel Elena Felix Greta Hugo Irene Jonas Karin Lucas Marta Nils Olga
    Pablo Rosa Samuel Tina Victor Wanda Yusuf Zora Omar""".split()
LAST_NAMES = """Moreau Keller Novak Silva Lindqvist Rossi Okafor Tanaka Petrov Garcia Haddad Jensen
    Kowalski Dubois Fischer Costa Nakamura Brennan Varga Osei""".split()
# city -> country (real geography, so the demo reads naturally)
CITIES = {
    "Paris": "France", "Lyon": "France", "Marseille": "France",
    "Berlin": "Germany", "Munich": "Germany", "Hamburg": "Germany",
    "Madrid": "Spain", "Seville": "Spain", "Valencia": "Spain",
    "Rome": "Italy", "Milan": "Italy", "Naples": "Italy",
    "Lisbon": "Portugal", "Porto": "Portugal",
    "Tokyo": "Japan", "Osaka": "Japan", "Kyoto": "Japan",
    "Cairo": "Egypt", "Alexandria": "Egypt",
    "Lima": "Peru", "Cusco": "Peru",
    "Warsaw": "Poland", "Krakow": "Poland",
    "Stockholm": "Sweden", "Gothenburg": "Sweden",
    "Athens": "Greece", "Thessaloniki": "Greece",
    "Istanbul": "Turkey", "Ankara": "Turkey",
    "Moscow": "Russia", "Kazan": "Russia",
    "Beijing": "China", "Shanghai": "China",
    "Hanoi": "Vietnam", "Saigon": "Vietnam",
    "Nairobi": "Kenya", "Mombasa": "Kenya",
    "Santiago": "Chile", "Valparaiso": "Chile",
    "Budapest": "Hungary",
}
# country -> (official language, capital)
COUNTRIES = {
    "France": ("French", "Paris"), "Germany": ("German", "Berlin"), "Spain": ("Spanish", "Madrid"),
    "Italy": ("Italian", "Rome"), "Portugal": ("Portuguese", "Lisbon"), "Japan": ("Japanese", "Tokyo"),
    "Egypt": ("Arabic", "Cairo"), "Peru": ("Quechua", "Lima"), "Poland": ("Polish", "Warsaw"),
    "Sweden": ("Swedish", "Stockholm"), "Greece": ("Greek", "Athens"), "Turkey": ("Turkish", "Ankara"),
    "Russia": ("Russian", "Moscow"), "China": ("Chinese", "Beijing"), "Vietnam": ("Vietnamese", "Hanoi"),
    "Kenya": ("Swahili", "Nairobi"), "Chile": ("Spanish", "Santiago"), "Hungary": ("Hungarian", "Budapest"),
}
LANGUAGES = sorted({lang for lang, _ in COUNTRIES.values()} | {"English", "Hindi", "Korean"})
COMPANIES = [
    "Northwind", "Bluepeak", "Corvane", "Dellmark", "Everlite", "Frostline", "Granthill", "Helixa",
    "Ironbay", "Juniper Labs", "Kestrel Works", "Lumora", "Maplecrest", "Nimbusoft", "Orbitel",
    "Pinecrest", "Quantis", "Redstone", "Solvane", "Trellis", "Umbra Motors", "Veridian",
    "Wavecrest", "Xantia", "Yellowfin", "Zephyra", "Arclight", "Brightwater", "Cobalt Foods",
    "Driftwood",
]
INSTRUMENTS = """piano violin cello guitar flute trumpet drums harp clarinet saxophone accordion
    banjo""".split()
SPORTS = """football basketball tennis cricket rugby baseball hockey volleyball handball golf cycling
    rowing""".split()
PRODUCTS = """cars phones software shoes furniture medicines toys bicycles cameras chocolate glasses
    batteries""".split()
# fmt: on

N_PERSONS = 240


@dataclass(frozen=True)
class Relation:
    """A relation between a subject type and an object type, with its phrasing templates.

    Templates contain `{s}` for the subject; the answer is the continuation after
    `prompt + " "`. Template 0 is the edit prompt, the others are its rephrases.
    """

    name: str
    subject_type: str
    object_type: str
    templates: tuple[str, ...]


@dataclass(frozen=True)
class OneHop:
    """A derived fact: `subject -base-> x -hop-> answer`, asked with one template.

    Trained with the true answer, so before an edit of `base` the model answers the old
    next hop; after the edit the portability answer is the new object's next hop.
    """

    name: str
    base: str
    hop: str
    template: str


RELATIONS: tuple[Relation, ...] = (
    Relation("born_in", "person", "city", ("{s} was born in", "Where was {s} born? In", "The birthplace of {s} is")),
    Relation(
        "lives_in", "person", "city", ("{s} lives in", "Which city does {s} live in? In", "The home town of {s} is")
    ),
    Relation(
        "works_for",
        "person",
        "company",
        ("{s} works for", "Who is the employer of {s}? It is", "The employer of {s} is"),
    ),
    Relation(
        "speaks", "person", "language", ("{s} speaks", "Which language does {s} speak?", "The mother tongue of {s} is")
    ),
    Relation(
        "plays",
        "person",
        "instrument",
        ("{s} plays the", "Which instrument does {s} play? The", "The instrument of {s} is the"),
    ),
    Relation(
        "headquartered_in",
        "company",
        "city",
        ("{s} is headquartered in", "Where is {s} based? In", "The head office of {s} is in"),
    ),
    Relation("makes", "company", "product", ("{s} makes", "What does {s} produce?", "The main product of {s} is")),
    Relation("located_in", "city", "country", ("{s} is located in", "In which country is {s}? In", "{s} is a city in")),
    Relation(
        "popular_sport",
        "city",
        "sport",
        ("The most popular sport in {s} is", "Which sport is most loved in {s}?", "People in {s} love to play"),
    ),
    Relation(
        "official_language",
        "country",
        "language",
        ("The official language of {s} is", "What language is spoken in {s}?", "In {s}, people speak"),
    ),
    Relation(
        "capital",
        "country",
        "city",
        ("The capital of {s} is", "What is the capital of {s}?", "The capital city of {s} is"),
    ),
)
ONE_HOPS: tuple[OneHop, ...] = (
    OneHop("birth_country", "born_in", "located_in", "The country of birth of {s} is"),
    OneHop("employer_city", "works_for", "headquartered_in", "{s} works for a company based in"),
    OneHop("hq_country", "headquartered_in", "located_in", "The company {s} is based in the country of"),
    OneHop("city_language", "located_in", "official_language", "The language of the country of {s} is"),
)
REL_BY_NAME = {r.name: r for r in RELATIONS}
HOP_BY_BASE = {h.base: h for h in ONE_HOPS}


@dataclass
class World:
    """A generated world: entities by type and one object per (subject, relation)."""

    seed: int
    entities: dict[str, list[str]]
    facts_table: dict[tuple[str, str], str]  # (subject, relation) -> object
    reserved: dict[str, str]  # subject -> its never-edited relation
    relations: tuple[Relation, ...] = RELATIONS
    one_hops: tuple[OneHop, ...] = ONE_HOPS
    _edit_order: list[tuple[str, str]] = field(default_factory=list, repr=False)

    # ---- facts -------------------------------------------------------------------------
    def subjects(self, relation: str) -> list[str]:
        return self.entities[REL_BY_NAME[relation].subject_type]

    def obj(self, subject: str, relation: str) -> str:
        return self.facts_table[(subject, relation)]

    def hop_answer(self, hop: OneHop, subject: str) -> str:
        return self.obj(self.obj(subject, hop.base), hop.hop)

    def facts_by_template(self) -> dict[str, list[tuple[str, str]]]:
        """Every fact as (prompt, answer), grouped by template id (`relation/i` or `hop/name`)."""
        out: dict[str, list[tuple[str, str]]] = {}
        for rel in self.relations:
            for i, tpl in enumerate(rel.templates):
                out[f"{rel.name}/{i}"] = [(tpl.format(s=s), self.obj(s, rel.name)) for s in self.subjects(rel.name)]
        for hop in self.one_hops:
            out[f"hop/{hop.name}"] = [
                (hop.template.format(s=s), self.hop_answer(hop, s)) for s in self.subjects(hop.base)
            ]
        return out

    def facts(self) -> list[tuple[str, str]]:
        """Every fact under every template (and every one-hop template), in a fixed order."""
        return [f for group in self.facts_by_template().values() for f in group]

    # ---- edits -------------------------------------------------------------------------
    def max_edits(self) -> int:
        return len(self._edit_order)

    def edit_records(self, n: int | None = None, seed: int | None = None) -> list[EditRecord]:
        """The first `n` edit records (default: all), deterministic for a given world and seed.

        Each record changes one fact to another object of the same type; the prefix of length k
        of `edit_records(n)` equals `edit_records(k)`.
        """
        seed = self.seed if seed is None else seed
        pairs = self._edit_order if n is None else self._edit_order[:n]
        if n is not None and n > len(self._edit_order):
            raise ValueError(f"the fact world has {len(self._edit_order)} editable facts; asked for {n}")
        return [self._record(subject, rel, seed) for subject, rel in pairs]

    def _record(self, subject: str, relation: str, seed: int) -> EditRecord:
        rel = REL_BY_NAME[relation]
        rng = random.Random(f"edit/{seed}/{subject}/{relation}")
        old = self.obj(subject, relation)
        hop = HOP_BY_BASE.get(relation)
        candidates = [o for o in self.entities[rel.object_type] if o != old]
        if hop is not None:
            # the new object's next hop must itself never be edited, and must differ from the old one
            good = [
                o
                for o in candidates
                if self.reserved.get(o) == hop.hop and self.obj(o, hop.hop) != self.obj(old, hop.hop)
            ]
            candidates = good or candidates
        target = rng.choice(candidates)

        # locality: same relation, another subject whose fact of this relation is reserved
        others = [s for s in self.subjects(relation) if s != subject and self.reserved[s] == relation]
        # prefer a neighbour whose answer is neither the old nor the new one, so a leak shows
        distinct = [s for s in others if self.obj(s, relation) not in (old, target)]
        other = rng.choice(distinct or others)
        locality = [
            LocalityPair(rel.templates[0].format(s=other), self.obj(other, relation), "same_relation"),
        ]
        # locality: same subject, its reserved (never edited) relation
        own = REL_BY_NAME[self.reserved[subject]]
        locality.append(LocalityPair(own.templates[0].format(s=subject), self.obj(subject, own.name), "same_subject"))
        portability = []
        if hop is not None:
            portability.append(PortabilityPair(hop.template.format(s=subject), self.obj(target, hop.hop), "one_hop"))
        return EditRecord(
            prompt=rel.templates[0].format(s=subject),
            target=target,
            subject=subject,
            ground_truth=old,
            rephrases=[t.format(s=subject) for t in rel.templates[1:]],
            locality=locality,
            portability=portability,
            id=f"fw{seed}-{relation}-{subject.replace(' ', '_')}",
        )


def _person_names(rng: random.Random, n: int) -> list[str]:
    combos = [f"{f} {last}" for f in FIRST_NAMES for last in LAST_NAMES]
    rng.shuffle(combos)
    return combos[:n]


def build_world(seed: int = 0) -> World:
    """Generate the fact world for `seed` (same seed, same world)."""
    rng = random.Random(f"world/{seed}")
    entities = {
        "person": _person_names(rng, N_PERSONS),
        "city": list(CITIES),
        "country": list(COUNTRIES),
        "company": list(COMPANIES),
        "language": list(LANGUAGES),
        "instrument": list(INSTRUMENTS),
        "sport": list(SPORTS),
        "product": list(PRODUCTS),
    }
    table: dict[tuple[str, str], str] = {}
    for rel in RELATIONS:
        for s in entities[rel.subject_type]:
            if rel.name == "located_in":
                table[(s, rel.name)] = CITIES[s]
            elif rel.name == "official_language":
                table[(s, rel.name)] = COUNTRIES[s][0]
            elif rel.name == "capital":
                table[(s, rel.name)] = COUNTRIES[s][1]
            else:
                table[(s, rel.name)] = rng.choice(entities[rel.object_type])

    # the reserved (never edited) relation of each subject rotates over its relations
    reserved: dict[str, str] = {}
    for stype, subjects in entities.items():
        rels = [r.name for r in RELATIONS if r.subject_type == stype]
        if not rels:
            continue
        offset = rng.randrange(len(rels))
        order = list(subjects)
        rng.shuffle(order)
        for i, s in enumerate(order):
            reserved[s] = rels[(i + offset) % len(rels)]

    # editable pairs, spread so that any prefix mixes relations in proportion to their size
    keyed = []
    for rel in RELATIONS:
        pairs = [(s, rel.name) for s in entities[rel.subject_type] if reserved[s] != rel.name]
        rng.shuffle(pairs)
        for i, p in enumerate(pairs):
            keyed.append(((i + rng.random()) / len(pairs), p))
    keyed.sort(key=lambda kp: kp[0])
    return World(
        seed=seed,
        entities=entities,
        facts_table=table,
        reserved=reserved,
        _edit_order=[p for _, p in keyed],
    )
