"""The embedded default corpus: venue descriptions with exact probabilities.

Each document describes one restaurant, pub or cafe, realised from an attribute record in the
manner of the E2E NLG data set, for example:

  The Golden Lantern is a cosy Italian coffee shop in the heart of the old town near the Royal
  Museum. It has a low price range and is not suitable for young children.

The grammar is one probabilistic program, `RestaurantCorpus._derive`, that takes every decision
(is an attribute mentioned, which value, which phrasing, which clause order, which sentence frame)
through a chooser. Swapping the chooser samples documents, replays a parsed derivation to score
it, or walks every derivation. The grammar is unambiguous (every text has one
derivation; the tests enumerate tiny configurations to check it), so the probability of a text is
that of its derivation and the entropy is the expected sum of the entropies of the choices made.

  corpus = default_corpus()
  train = corpus.sample(10_000, seed=split_seed("train"))
  bits = -corpus.log_prob(train[0].text) / math.log(2)

A record serialises to one line, the data side of the data-to-text and text-to-data tasks:

  format_record(train[0].record)  # "name: The Golden Lantern | eat_type: coffee shop | ..."
"""
import bisect
import dataclasses
import functools
import itertools
import math
import re
import string
from typing import Container, Iterator, Mapping, Sequence

import numpy as np

REQUIRED_ATTRIBUTES = ("name", "eat_type", "food", "area")
OPTIONAL_ATTRIBUTES = (
    "atmosphere", "near", "price_range", "customer_rating", "family_friendly", "signature_dish")
# Every attribute, in the order of a document's record and of its serialisation.
ATTRIBUTES = REQUIRED_ATTRIBUTES + OPTIONAL_ATTRIBUTES
# Optional attributes realised as clauses ("has a low price range"); the others sit in the intro.
_PREDICATES = ("price_range", "customer_rating", "family_friendly", "signature_dish")
_MAX_FOLLOW_UP_SENTENCES = 2
_MIN_CLAUSES_PER_FOLLOW_UP = 2
_SPLITS = ("train", "validation", "test")

_NAME_ADJECTIVES = (
    "Golden", "Silver", "Crimson", "Blue", "Green", "Scarlet", "Amber", "Ivory", "Little", "Happy",
    "Hungry", "Lucky", "Jolly", "Rusty", "Wandering", "Sleeping", "Dancing", "Laughing", "Flying",
    "Copper", "Velvet", "Purple", "Humble", "Secret", "Hidden", "Merry", "Wild", "Gentle", "Brave",
    "Clever", "Twisted", "Painted", "Smoking", "Spotted", "Sunny", "Stormy", "Northern", "Southern",
    "Crooked", "Silent", "Singing", "Roaring", "Sleepy", "Dusty", "Frosty", "Misty", "Rosy", "Tipsy",
    "Curious", "Cheerful", "Proud", "Noble", "Ancient", "Hollow", "Lonely", "Marble", "Emerald",
    "Sapphire", "Saffron", "Cinnamon", "Honey", "Ginger", "Juniper", "Lavender", "Wooden", "Crystal",
    "Lazy", "Busy", "Bold", "Brass", "Coral", "Mellow", "Drowsy", "Restless", "Whistling", "Nimble",
    "Fearless", "Starry", "Breezy", "Shady", "Rambling", "Jumping", "Galloping", "Hopping",
    "Prancing", "Sneaky", "Grumpy", "Dapper", "Plucky", "Wily", "Rowdy", "Shiny", "Polished",
    "Tangled", "Feathered", "Glowing", "Blazing", "Humming", "Winking", "Thirsty")
_NAME_NOUNS = (
    "Lantern", "Kettle", "Spoon", "Fork", "Anchor", "Lion", "Fox", "Owl", "Goose", "Swan", "Stag",
    "Rabbit", "Bear", "Dragon", "Barrel", "Acorn", "Oak", "Willow", "Thistle", "Rose", "Plough",
    "Wheel", "Harp", "Bell", "Compass", "Teapot", "Ladle", "Peppercorn", "Olive", "Lemon", "Fig",
    "Cherry", "Walnut", "Peacock", "Heron", "Otter", "Badger", "Hare", "Falcon", "Raven", "Sparrow",
    "Robin", "Wren", "Magpie", "Pelican", "Tortoise", "Whale", "Dolphin", "Pearl", "Lighthouse",
    "Windmill", "Cauldron", "Skillet", "Pantry", "Cellar", "Hearth", "Chimney", "Lamp", "Candle",
    "Feather", "Pebble", "Meadow", "Orchard", "Vine", "Ivy", "Fern", "Clover", "Tulip", "Daisy",
    "Poppy", "Sunflower", "Cedar", "Maple", "Elm", "Birch", "Bramble", "Hedgehog", "Squirrel",
    "Kingfisher", "Nightingale", "Stork", "Puffin", "Beaver", "Weasel", "Mole", "Toad", "Salamander",
    "Trumpet", "Fiddle", "Drum", "Anvil", "Horseshoe", "Saddle", "Thimble", "Button", "Kite", "Sail",
    "Oar", "Helm", "Barge")
_SURNAMES = (
    "Rossi", "Tanaka", "Dubois", "Patel", "Murphy", "Garcia", "Nguyen", "Kowalski", "Schmidt",
    "Silva", "Okafor", "Jensen", "Novak", "Moreau", "Costa", "Hughes", "Fraser", "Larsen", "Romano",
    "Sato", "Kim", "Haddad", "Mensah", "Lopez", "Fischer", "Bianchi", "Suzuki", "Martin", "Kaur",
    "Walsh", "Hernandez", "Tran", "Nowak", "Weber", "Santos", "Adeyemi", "Nielsen", "Horvat", "Leroy",
    "Ferrari", "Yamamoto", "Chen", "Singh", "Byrne", "Alvarez", "Pham", "Wojcik", "Becker", "Pereira",
    "Bello")
_EAT_TYPES = (
    "restaurant", "pub", "coffee shop", "bistro", "wine bar", "tea room", "diner", "brasserie",
    "noodle bar", "bakery")
_FOODS = (
    "Italian", "Japanese", "French", "Chinese", "Indian", "English", "Mexican", "Thai", "Greek",
    "Spanish", "Turkish", "Korean", "Vietnamese", "Lebanese", "Moroccan", "Ethiopian", "Peruvian",
    "Caribbean", "Scottish", "Portuguese", "German", "Polish", "Brazilian", "Persian", "Russian",
    "Swedish", "Hungarian", "Argentinian", "Malaysian", "Indonesian", "Georgian", "Nepalese",
    "Filipino", "Welsh", "Irish")
_AREAS = (
    "city centre", "riverside", "old town", "harbour", "university quarter", "market district",
    "theatre district", "west end", "east end", "waterfront", "cathedral quarter", "docklands",
    "arts quarter", "financial district", "seafront", "hillside")
_ATMOSPHERES = (
    "cosy", "lively", "quiet", "elegant", "rustic", "modern", "friendly", "charming", "bustling",
    "relaxed", "stylish", "traditional", "intimate", "casual", "popular", "welcoming", "vibrant",
    "homely", "romantic", "trendy", "spacious", "quirky", "peaceful", "unpretentious", "snug",
    "buzzing", "refined", "understated", "glamorous", "bohemian", "minimalist")
_LANDMARK_ADJECTIVES = (
    "Old", "Royal", "Grand", "Central", "Victoria", "Albert", "Kings", "Queens", "Northgate", "Abbey",
    "Castle", "Civic", "Memorial", "Botanical", "Regent", "Jubilee", "Clock", "Stone", "Iron",
    "Millennium", "Maritime", "Westgate", "Eastgate", "Tudor", "Heritage", "Lakeside", "Hilltop",
    "Festival", "Empire", "Liberty")
_LANDMARK_NOUNS = (
    "Bridge", "Theatre", "Museum", "Library", "Station", "Park", "Gallery", "Cathedral", "Market",
    "Hall", "Square", "Gardens", "Tower", "Cinema", "Stadium", "Arcade", "Fountain", "Chapel", "Pier",
    "Observatory", "Aquarium", "Playhouse", "Monument", "Bandstand", "Lido")
_INGREDIENTS = (
    "lamb", "chicken", "duck", "pork", "beef", "mushroom", "aubergine", "prawn", "crab", "salmon",
    "lentil", "spinach", "pumpkin", "chickpea", "tofu", "squid", "rabbit", "venison", "cod", "tomato",
    "cheese", "potato", "onion", "leek", "fennel", "chorizo", "halloumi", "mackerel", "octopus",
    "pheasant", "courgette", "cauliflower", "beetroot", "artichoke", "goat", "sardine", "tuna",
    "trout", "mussel", "pepper", "halibut", "scallop", "lobster", "quail", "turkey", "asparagus",
    "broccoli", "carrot", "parsnip", "plum")
_DISHES = (
    "curry", "stew", "pie", "risotto", "soup", "salad", "tart", "burger", "pasta", "casserole",
    "broth", "omelette", "sandwich", "kebab", "roast", "dumpling", "pancake", "skewer", "flatbread",
    "gratin", "tagine", "lasagne", "chowder", "pilaf", "paella", "hotpot", "terrine", "fritter")

_FULL_VALUES = {
    "name": (tuple(f"The {adjective} {noun}" for adjective in _NAME_ADJECTIVES for noun in _NAME_NOUNS)
             + tuple(f"{surname}'s {noun}" for surname in _SURNAMES for noun in _NAME_NOUNS)),
    "eat_type": _EAT_TYPES,
    "food": _FOODS,
    "area": _AREAS,
    "atmosphere": _ATMOSPHERES,
    "near": tuple(f"{adjective} {noun}" for adjective in _LANDMARK_ADJECTIVES for noun in _LANDMARK_NOUNS),
    "price_range": ("low", "moderate", "high"),
    "customer_rating": ("low", "average", "high", "excellent"),
    "family_friendly": ("yes", "no"),
    "signature_dish": tuple(f"{ingredient} {dish}" for ingredient in _INGREDIENTS for dish in _DISHES),
}
# One value per attribute (two names, one of each form; both family values), so that a handful of
# optional attributes gives a support small enough to enumerate.
_TINY_VALUES = {
    "name": ("The Golden Lantern", "Rossi's Lantern"),
    "eat_type": ("coffee shop",),
    "food": ("Italian",),
    "area": ("city centre",),
    "atmosphere": ("cosy",),
    "near": ("Royal Museum",),
    "price_range": ("low",),
    "customer_rating": ("low",),
    "family_friendly": ("yes", "no"),
    "signature_dish": ("lamb curry",),
}

_AREA_PHRASES = ("in the {} area", "in the heart of the {}", "right in the {}")
_NEAR_PHRASES = ("near the {}", "close to the {}", "a short walk from the {}", "next to the {}")
_LOCATION_ORDERS = ("{area} {near}", "{near} {area}")
# Clause templates per predicate; the value fills "{}" (family_friendly through _SURFACE_FORMS).
_CLAUSE_TEMPLATES = {
    "price_range": (
        "has a {} price range", "offers food in the {} price range", "charges {} prices for a meal"),
    "customer_rating": (
        "has a {} customer rating", "is rated {} by its customers", "receives {} ratings from diners"),
    "family_friendly": (
        "is {}a good choice for families", "is {}suitable for young children",
        "is {}a family friendly venue"),
    "signature_dish": (
        "is known for its {}", "serves a famous {}", "has {} as its signature dish"),
}
_SURFACE_FORMS = {"family_friendly": {"yes": "", "no": "not "}}
# Frames of the first sentence, without and with clauses after the location.
_INTRO_FRAMES_PLAIN = (
    "{name} is {noun_phrase} {location}.",
    "Located {location}, {name} is {noun_phrase}.",
    "There is {noun_phrase} called {name} {location}.",
)
_INTRO_FRAMES_WITH_CLAUSES = (
    "{name} is {noun_phrase} {location} and {clauses}.",
    "Located {location}, {name} is {noun_phrase} that {clauses}.",
    "There is {noun_phrase} called {name} {location} that {clauses}.",
    "{name}, {noun_phrase} {location}, {clauses}.",
)
_OPENERS = ("", "Also, ", "In addition, ", "Moreover, ")


@dataclasses.dataclass(frozen=True)
class Document:
  """One generated document.

  Attributes:
    text: the document, printable ASCII on one line.
    record: attribute -> value, for the attributes that the text mentions.
    log_prob: exact natural-log probability of `text` under the generator.
  """
  text: str
  record: Mapping[str, str]
  log_prob: float


@dataclasses.dataclass(frozen=True)
class RestaurantCorpus:
  """Settings of the venue-description grammar.

  Attributes:
    optional_attributes: the optional attributes a document may mention (a subset of
      OPTIONAL_ATTRIBUTES); name, eat_type, food and area are always mentioned.
    presence_prob: probability that each optional attribute is mentioned.
    tiny: use one or two values per attribute, so the whole support can be enumerated.
  """
  optional_attributes: tuple[str, ...] = OPTIONAL_ATTRIBUTES
  presence_prob: float = 0.5
  tiny: bool = False

  def __post_init__(self):
    unknown = set(self.optional_attributes) - set(OPTIONAL_ATTRIBUTES)
    if unknown or len(set(self.optional_attributes)) != len(self.optional_attributes):
      raise ValueError(f"optional_attributes must be distinct names from {OPTIONAL_ATTRIBUTES}, "
                       f"got {self.optional_attributes}")
    if not 0.0 < self.presence_prob < 1.0:
      raise ValueError(f"presence_prob must lie in (0, 1), got {self.presence_prob}")

  def attribute_values(self) -> dict[str, tuple[str, ...]]:
    """Every attribute this corpus can mention, with its possible values."""
    return dict(self._values)

  def attribute_labels(self, records: Sequence[Mapping[str, str]], attributes: Sequence[str]) -> np.ndarray:
    """int32[N, A]: the index of each record's value of each attribute in `attribute_values()`, -1
    where the record does not mention it (labels for an attribute classifier)."""
    return np.array([[self._values[a].index(record[a]) if a in record else -1 for a in attributes]
                     for record in records], np.int32).reshape(len(records), len(attributes))

  def sample(self, num_docs: int, seed: int) -> list[Document]:
    """Draws `num_docs` documents; the same seed gives the same documents."""
    uniforms = _uniforms(np.random.default_rng(seed))
    documents = []
    for _ in range(num_docs):
      chooser = _Sampler(uniforms)
      text, record = self._derive(chooser)
      documents.append(Document(text, record, chooser.log_prob))
    return documents

  def log_prob(self, text: str) -> float:
    """Exact natural-log probability of `text`; -inf if the grammar cannot produce it."""
    log_probs = [log_prob for _, log_prob in self._derivations(text)]
    if not log_probs:
      return -math.inf
    peak = max(log_probs)
    return peak + math.log(sum(math.exp(log_prob - peak) for log_prob in log_probs))

  def parse(self, text: str) -> dict[str, str] | None:
    """The attribute record of a document the grammar can produce, None for any other text."""
    derivations = self._derivations(text)
    return derivations[0][0] if derivations else None

  @functools.cache  # a walk of ~0.3 s; settings are frozen and hashable, so equal corpora share it
  def entropy_bits(self) -> float:
    """Exact entropy of the document distribution, in bits per document.

    By the chain rule, the entropy of a derivation is the expected sum of the entropies of the
    choices it makes. Only the choices that change what is chosen later are walked one by one;
    that leaves a few hundred paths. Derivations and texts are in one-to-one correspondence, so
    this is also the entropy of the texts.
    """
    nats = sum(math.exp(walker.branch_log_prob) * walker.entropy_nats
               for _, _, walker in self._walk(branch_everywhere=False))
    return nats / math.log(2)

  def num_documents(self) -> int:
    """Exact number of distinct documents the grammar can produce."""
    return sum(walker.completions for _, _, walker in self._walk(branch_everywhere=False))

  def enumerate_documents(self) -> Iterator[Document]:
    """Every document with its probability; only feasible for tiny configurations."""
    for text, record, walker in self._walk(branch_everywhere=True):
      yield Document(text, record, walker.log_prob)

  def _derive(self, choose: "_Chooser") -> tuple[str, dict[str, str]]:
    """The grammar: makes every choice of one derivation through `choose`."""
    record = {}
    for attribute in ATTRIBUTES:
      if attribute in OPTIONAL_ATTRIBUTES and (
          attribute not in self.optional_attributes
          or not choose(f"present:{attribute}", 2, self._presence_probs, branching=True)):
        continue
      values = self._values[attribute]
      record[attribute] = values[choose(f"value:{attribute}", len(values))]
    unordered = [attribute for attribute in _PREDICATES if attribute in record]
    layouts = _layouts(len(unordered))
    intro_size, *follow_up_sizes = layouts[choose("layout", len(layouts), branching=True)]
    clauses = []
    while unordered:
      attribute = unordered.pop(choose(f"order:{len(clauses)}", len(unordered)))
      template = choose(f"template:{attribute}", len(_CLAUSE_TEMPLATES[attribute]))
      clauses.append(_clause(attribute, template, record[attribute]))
    sentences = [_intro(record, clauses[:intro_size], choose)]
    start = intro_size
    for index, size in enumerate(follow_up_sizes):
      opener = _OPENERS[choose(f"opener:{index}", len(_OPENERS))]
      subjects = _subjects(record, capitalised=not opener)
      subject = subjects[choose(f"subject:{index}", len(subjects))]
      sentences.append(f"{opener}{subject} {_join_clauses(clauses[start:start + size])}.")
      start += size
    return " ".join(sentences), record

  def _derivations(self, text: str) -> list[tuple[dict[str, str], float]]:
    """Every derivation of `text`, as (record, log-prob); at most one for this grammar."""
    if not text.endswith("."):
      return []
    intro, *follow_ups = [sentence + "." for sentence in text[:-1].split(". ")]
    found = {}
    for choices, record, intro_clauses in self._parse_intro(intro):
      options = [self._parse_follow_up(sentence, record) for sentence in follow_ups]
      for follow_up_parses in itertools.product(*options):
        derivation = self._complete(choices, record, intro_clauses, follow_up_parses)
        if derivation is None:
          continue
        replay = _Replay(derivation)
        replayed_text, replayed_record = self._derive(replay)
        if replayed_text == text:
          found[tuple(sorted(derivation.items()))] = (replayed_record, replay.log_prob)
    return list(found.values())

  def _parse_intro(self, sentence: str) -> Iterator[tuple[dict[str, int], dict[str, str], list]]:
    """Yields (choices, record, clauses) for each reading of the first sentence."""
    known = {"name": self._value_index["name"], "noun_phrase": self._noun_phrases}
    for frames in (_INTRO_FRAMES_PLAIN, _INTRO_FRAMES_WITH_CLAUSES):
      for frame_index, frame in enumerate(frames):
        for slots in _fill_slots(frame, sentence, known):
          noun_phrase = self._noun_phrases[slots["noun_phrase"]]
          clauses = self._parse_clauses(slots["clauses"]) if "clauses" in slots else []
          if clauses is None:
            continue
          for location_choices, location_record in self._parse_location(slots["location"]):
            record = {"name": slots["name"], **noun_phrase, **location_record}
            yield {"frame": frame_index, **location_choices}, record, clauses

  def _parse_location(self, location: str) -> Iterator[tuple[dict[str, int], dict[str, str]]]:
    """Yields (choices, record) for each reading of an area phrase and optional landmark."""
    if location in self._area_phrases:
      phrase, area = self._area_phrases[location]
      yield {"area_phrase": phrase}, {"area": area}
    for near_first, order in enumerate(_LOCATION_ORDERS):
      for slots in _fill_slots(order, location, {"area": self._area_phrases, "near": self._near_phrases}):
        area_phrase, area = self._area_phrases[slots["area"]]
        near_phrase, near = self._near_phrases[slots["near"]]
        choices = {"area_phrase": area_phrase, "near_phrase": near_phrase, "near_first": near_first}
        yield choices, {"area": area, "near": near}

  def _parse_follow_up(self, sentence: str, record: Mapping[str, str]) -> list[tuple[int, int, list]]:
    """Every (opener, subject, clauses) reading of a sentence after the first."""
    readings = []
    for opener_index, opener in enumerate(_OPENERS):
      for subject_index, subject in enumerate(_subjects(record, capitalised=not opener)):
        prefix = f"{opener}{subject} "
        if sentence.startswith(prefix):
          clauses = self._parse_clauses(sentence[len(prefix):-1])
          if clauses is not None:
            readings.append((opener_index, subject_index, clauses))
    return readings

  def _parse_clauses(self, text: str) -> list[tuple[str, int, str]] | None:
    """The (attribute, template, value) of each clause in "a, b and c", or None."""
    *leading, last = text.split(", ")
    final = last.split(" and ")
    if len(final) > 2 or (leading and len(final) != 2):
      return None
    clauses = [self._clauses.get(phrase) for phrase in leading + final]
    return None if None in clauses else clauses

  def _complete(self, choices, record, intro_clauses, follow_up_parses) -> dict[str, int] | None:
    """All choices of a derivation from the parts parsed out of its sentences, or None."""
    clause_groups = [intro_clauses] + [clauses for _, _, clauses in follow_up_parses]
    clauses = [clause for group in clause_groups for clause in group]
    ordered = [attribute for attribute, _, _ in clauses]
    layout = tuple(len(group) for group in clause_groups)
    if len(set(ordered)) != len(ordered) or layout not in _layouts(len(ordered)):
      return None
    record = {**record, **{attribute: value for attribute, _, value in clauses}}
    derivation = dict(choices)
    derivation["layout"] = _layouts(len(ordered)).index(layout)
    for attribute in self.optional_attributes:
      derivation[f"present:{attribute}"] = int(attribute in record)
    for attribute, value in record.items():
      derivation[f"value:{attribute}"] = self._value_index[attribute][value]
    unordered = [attribute for attribute in _PREDICATES if attribute in record]
    for position, (attribute, template, _) in enumerate(clauses):
      derivation[f"order:{position}"] = unordered.index(attribute)
      unordered.remove(attribute)
      derivation[f"template:{attribute}"] = template
    for index, (opener, subject, _) in enumerate(follow_up_parses):
      derivation[f"opener:{index}"] = opener
      derivation[f"subject:{index}"] = subject
    return derivation

  def _walk(self, branch_everywhere: bool) -> Iterator[tuple[str, dict[str, str], "_Walker"]]:
    """Depth-first walk over derivations, re-running the grammar once per path."""
    pending = [[]]
    while pending:
      walker = _Walker(pending.pop(), branch_everywhere)
      text, record = self._derive(walker)
      pending.extend(walker.siblings)
      yield text, record, walker

  @functools.cached_property
  def _values(self) -> dict[str, tuple[str, ...]]:
    table = _TINY_VALUES if self.tiny else _FULL_VALUES
    return {attribute: table[attribute] for attribute in ATTRIBUTES
            if attribute in REQUIRED_ATTRIBUTES or attribute in self.optional_attributes}

  @functools.cached_property
  def _value_index(self) -> dict[str, dict[str, int]]:
    return {attribute: _inverse(values) for attribute, values in self._values.items()}

  @functools.cached_property
  def _presence_probs(self) -> tuple[float, float]:
    return (1.0 - self.presence_prob, self.presence_prob)

  @functools.cached_property
  def _noun_phrases(self) -> dict[str, dict[str, str]]:
    atmospheres = (None,) + self._values.get("atmosphere", ())
    readings = {}
    for atmosphere, food, eat_type in itertools.product(
        atmospheres, self._values["food"], self._values["eat_type"]):
      record = {"eat_type": eat_type, "food": food}
      if atmosphere is not None:
        record["atmosphere"] = atmosphere
      readings[_noun_phrase(record)] = record
    return _unique(readings, len(atmospheres) * len(self._values["food"]) * len(self._values["eat_type"]))

  @functools.cached_property
  def _area_phrases(self) -> dict[str, tuple[int, str]]:
    return _phrase_table(_AREA_PHRASES, self._values["area"])

  @functools.cached_property
  def _near_phrases(self) -> dict[str, tuple[int, str]]:
    return _phrase_table(_NEAR_PHRASES, self._values.get("near", ()))

  @functools.cached_property
  def _clauses(self) -> dict[str, tuple[str, int, str]]:
    readings = {}
    for attribute in _PREDICATES:
      for template in range(len(_CLAUSE_TEMPLATES[attribute])):
        for value in self._values.get(attribute, ()):
          readings[_clause(attribute, template, value)] = (attribute, template, value)
    return _unique(readings, sum(len(_CLAUSE_TEMPLATES[attribute]) * len(self._values.get(attribute, ()))
                                 for attribute in _PREDICATES))


def default_corpus() -> RestaurantCorpus:
  """The corpus that `make demo` trains on."""
  return RestaurantCorpus()


def split_seed(split: str, seed: int = 0) -> int:
  """The sampling seed of a split; distinct for every (split, seed) pair."""
  if split not in _SPLITS:
    raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
  if seed < 0:
    raise ValueError(f"seed must be non-negative, got {seed}")
  return len(_SPLITS) * seed + _SPLITS.index(split)


def format_record(record: Mapping[str, str], attributes: Sequence[str] = ()) -> str:
  """One line "name: ... | eat_type: ... | ..." of a record, its attributes in ATTRIBUTES order.

  Args:
    record: attribute -> value, as in `Document.record`.
    attributes: the attributes to write, where the record has them; empty for all it has.
  """
  unknown = (set(record) | set(attributes)) - set(ATTRIBUTES)
  if unknown:
    raise ValueError(f"unknown attributes {sorted(unknown)}; expected names from {ATTRIBUTES}")
  return " | ".join(f"{attribute}: {record[attribute]}" for attribute in ATTRIBUTES
                    if attribute in record and (not attributes or attribute in attributes))


def parse_record(text: str) -> dict[str, str] | None:
  """The record that `format_record` wrote as `text`, None if `text` is not such a line.

  Whitespace around names and values is ignored; the fields may come in any order. An empty
  text, a field without ": ", an unknown or repeated attribute or an empty value gives None.
  """
  record = {}
  for field in text.split("|"):
    attribute, separator, value = field.partition(": ")
    attribute, value = attribute.strip(), value.strip()
    if not separator or not value or attribute not in ATTRIBUTES or attribute in record:
      return None
    record[attribute] = value
  return record


class _Chooser:
  """Resolves the choices of one derivation and adds up their log-probability."""

  def __init__(self):
    self.log_prob = 0.0

  def __call__(self, key: str, num_options: int, probs: Sequence[float] | None = None,
               branching: bool = False) -> int:
    """Returns the option taken at one choice.

    Args:
      key: names the choice, uniquely within a derivation.
      num_options: how many options there are.
      probs: their probabilities; uniform when None.
      branching: whether the option taken changes which choices come later.
    """
    index = self._pick(key, num_options, probs, branching)
    self.log_prob += math.log(probs[index]) if probs else -math.log(num_options)
    return index

  def _pick(self, key, num_options, probs, branching) -> int:
    raise NotImplementedError


class _Sampler(_Chooser):
  """Takes options at random, one uniform draw per choice."""

  def __init__(self, uniforms: Iterator[float]):
    super().__init__()
    self._uniforms = uniforms

  def _pick(self, key, num_options, probs, branching):
    del key, branching
    uniform = next(self._uniforms)
    if probs is None:
      return min(int(uniform * num_options), num_options - 1)
    return min(bisect.bisect_right(list(itertools.accumulate(probs)), uniform), num_options - 1)


class _Replay(_Chooser):
  """Takes the options of a parsed derivation, given as key -> option."""

  def __init__(self, derivation: Mapping[str, int]):
    super().__init__()
    self._derivation = derivation

  def _pick(self, key, num_options, probs, branching):
    del num_options, probs, branching
    return self._derivation[key]


class _Walker(_Chooser):
  """Follows one path of a depth-first walk over the choices, noting the paths beside it.

  Attributes:
    siblings: option paths still to walk, each leaving this path at a branching choice that
      this walker was the first to reach.
    branch_log_prob: log-probability of the options taken at branching choices.
    entropy_nats: sum of the entropies of all choices met.
    completions: number of ways to take the choices that were not branched on.
  """

  def __init__(self, prefix: list[int], branch_everywhere: bool):
    super().__init__()
    self._prefix = prefix
    self._branch_everywhere = branch_everywhere
    self._path = []
    self.siblings = []
    self.branch_log_prob = 0.0
    self.entropy_nats = 0.0
    self.completions = 1

  def _pick(self, key, num_options, probs, branching):
    del key
    branching = branching or self._branch_everywhere
    if len(self._path) < len(self._prefix):
      index = self._prefix[len(self._path)]
    else:
      index = 0
      if branching:
        self.siblings.extend(self._path + [option] for option in range(1, num_options))
    self._path.append(index)
    probs = probs or [1.0 / num_options] * num_options
    self.entropy_nats -= sum(p * math.log(p) for p in probs)
    if branching:
      self.branch_log_prob += math.log(probs[index])
    else:
      self.completions *= num_options
    return index


def _uniforms(rng: np.random.Generator, block_size: int = 65536) -> Iterator[float]:
  """An endless stream of uniform draws in [0, 1), drawn from `rng` a block at a time."""
  while True:
    yield from rng.random(block_size).tolist()


@functools.cache
def _layouts(num_clauses: int) -> tuple[tuple[int, ...], ...]:
  """Ways to share clauses between the intro and follow-up sentences of enough clauses each."""
  layouts = []
  for intro_size in range(num_clauses + 1):
    rest = num_clauses - intro_size
    for num_follow_ups in range(_MAX_FOLLOW_UP_SENTENCES + 1):
      for sizes in itertools.product(range(_MIN_CLAUSES_PER_FOLLOW_UP, rest + 1), repeat=num_follow_ups):
        if sum(sizes) == rest:
          layouts.append((intro_size, *sizes))
  return tuple(layouts)


def _intro(record: Mapping[str, str], clauses: Sequence[str], choose: _Chooser) -> str:
  """The first sentence: name, noun phrase and location, then any clauses."""
  location = _AREA_PHRASES[choose("area_phrase", len(_AREA_PHRASES))].format(record["area"])
  if "near" in record:
    near = _NEAR_PHRASES[choose("near_phrase", len(_NEAR_PHRASES))].format(record["near"])
    order = _LOCATION_ORDERS[choose("near_first", len(_LOCATION_ORDERS))]
    location = order.format(area=location, near=near)
  frames = _INTRO_FRAMES_WITH_CLAUSES if clauses else _INTRO_FRAMES_PLAIN
  frame = frames[choose("frame", len(frames))]
  return frame.format(name=record["name"], noun_phrase=_noun_phrase(record), location=location,
                      clauses=_join_clauses(clauses))


def _noun_phrase(record: Mapping[str, str]) -> str:
  words = ["a", record.get("atmosphere"), record["food"], record["eat_type"]]
  return _with_articles(" ".join(word for word in words if word))


def _clause(attribute: str, template: int, value: str) -> str:
  surface = _SURFACE_FORMS.get(attribute, {}).get(value, value)
  return _with_articles(_CLAUSE_TEMPLATES[attribute][template].format(surface))


def _subjects(record: Mapping[str, str], capitalised: bool) -> tuple[str, ...]:
  pronoun, article = ("It", "The") if capitalised else ("it", "the")
  return (pronoun, f"{article} {record['eat_type']}", record["name"])


def _join_clauses(clauses: Sequence[str]) -> str:
  if len(clauses) < 2:
    return "".join(clauses)
  return f"{', '.join(clauses[:-1])} and {clauses[-1]}"


@functools.cache
def _with_articles(phrase: str) -> str:
  """Turns "a" into "an" before a vowel."""
  return re.sub(r"\ba (?=[aeiouAEIOU])", "an ", phrase)


def _phrase_table(templates: Sequence[str], values: Sequence[str]) -> dict[str, tuple[int, str]]:
  readings = {template.format(value): (index, value)
              for index, template in enumerate(templates) for value in values}
  return _unique(readings, len(templates) * len(values))


def _inverse(values: Sequence[str]) -> dict[str, int]:
  return _unique({value: index for index, value in enumerate(values)}, len(values))


def _unique(readings: dict, num_derivations: int) -> dict:
  """`readings` (phrase -> reading), after checking that no two derivations gave one phrase."""
  if len(readings) != num_derivations:
    raise ValueError(f"{num_derivations - len(readings)} phrases have two readings")
  return readings


@functools.cache
def _template_parts(template: str) -> tuple[list[str], list[str]]:
  """The literals and the field names of a format string; literals[i] precedes fields[i]."""
  literals, fields = [], []
  for literal, field, _, _ in string.Formatter().parse(template):
    literals.append(literal)
    if field is not None:
      fields.append(field)
  if len(literals) == len(fields):
    literals.append("")
  return literals, fields


def _fill_slots(template: str, text: str, known: Mapping[str, Container[str]]) -> Iterator[dict[str, str]]:
  """Every assignment of non-empty strings to the fields of `template` that gives `text`.

  Args:
    template: a format string whose fields are separated by non-empty literals.
    text: the string to match.
    known: for some fields, the strings they may take; other fields take any string.
  """
  literals, fields = _template_parts(template)
  if not text.startswith(literals[0]):
    return

  def fill(start: int, field: int) -> Iterator[dict[str, str]]:
    name, delimiter = fields[field], literals[field + 1]
    if field == len(fields) - 1:
      end = len(text) - len(delimiter)
      if end > start and text.endswith(delimiter) and text[start:end] in known.get(name, text[start:end]):
        yield {name: text[start:end]}
      return
    end = text.find(delimiter, start + 1)
    while end != -1:
      if name not in known or text[start:end] in known[name]:
        for rest in fill(end + len(delimiter), field + 1):
          yield {name: text[start:end], **rest}
      end = text.find(delimiter, end + 1)

  yield from fill(len(literals[0]), 0)
