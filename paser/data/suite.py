"""The capability suite: paser's own generated instruction pool with exact answers.

Twelve families of small tasks (arithmetic, unit conversion, sorting, string manipulation,
counting, weekdays, reading Python, JSON formatting, antonyms, capitals, comparison, sequences),
each phrased several ways, some with an ``input`` field. Records are in Alpaca layout plus
``id`` and ``family``. The suite is deterministic for a seed and serves three purposes: the
embedded default needs no download, the family labels measure clustering quality, and the exact
answers measure recovery as accuracy per family.

    python -c "from paser.data.suite import generate_suite; print(generate_suite(24)[:3])"
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Callable

from paser.data.pools import FieldMap, to_records

Task = tuple[str, str, str]  # instruction, input, output

_ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("early", "late"), ("strong", "weak"), ("rich", "poor"), ("full", "empty"),
    ("high", "low"), ("young", "old"), ("hard", "soft"), ("wet", "dry"), ("loud", "quiet"),
    ("thick", "thin"), ("cheap", "expensive"), ("brave", "cowardly"), ("near", "far"),
    ("clean", "dirty"), ("deep", "shallow"), ("heavy", "light"), ("wide", "narrow"),
    ("true", "false"), ("safe", "dangerous"), ("sharp", "dull"), ("sweet", "sour"),
    ("inside", "outside"), ("above", "below"), ("begin", "end"), ("buy", "sell"),
    ("win", "lose"), ("accept", "reject"), ("increase", "decrease"), ("arrive", "depart"),
    ("remember", "forget"), ("push", "pull"), ("friend", "enemy"), ("ancient", "modern"),
    ("victory", "defeat"),
]
_CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Australia", "Canberra"), ("Russia", "Moscow"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Turkey", "Ankara"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("South Korea", "Seoul"), ("Indonesia", "Jakarta"),
    ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Morocco", "Rabat"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Cuba", "Havana"), ("Colombia", "Bogota"), ("Netherlands", "Amsterdam"),
]
_UNITS = [  # (from, to, factor, decimals)
    ("kilometers", "meters", 1000, 0), ("meters", "centimeters", 100, 0), ("hours", "minutes", 60, 0),
    ("minutes", "seconds", 60, 0), ("kilograms", "grams", 1000, 0), ("liters", "milliliters", 1000, 0),
    ("days", "hours", 24, 0), ("weeks", "days", 7, 0), ("feet", "inches", 12, 0), ("yards", "feet", 3, 0),
]
_WORDS = ["apple", "river", "garden", "planet", "silver", "window", "orange", "candle", "forest",
          "button", "rocket", "pencil", "marble", "castle", "dragon", "violet", "harbor", "meadow",
          "copper", "lantern", "thunder", "pepper", "basket", "mirror", "tunnel", "island"]
_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana", "Ivo", "Jon", "Kai", "Lea"]
_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _pick(rng: random.Random, options: list[str]) -> str:
    return options[rng.randrange(len(options))]


def _arithmetic(rng: random.Random) -> Task:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    sym, value = [("+", a + b), ("-", a - b), ("*", a * b)][rng.randrange(3)]
    expr = f"{a} {sym} {b}"
    phr = _pick(rng, ["Compute {e}.", "What is {e}?", "Calculate the value of {e}.",
                      "Evaluate the expression below.", "Give the result of this arithmetic."])
    if "{e}" in phr:
        return phr.format(e=expr), "", str(value)
    return phr, expr, str(value)


def _unit_conversion(rng: random.Random) -> Task:
    src, dst, factor, _ = _UNITS[rng.randrange(len(_UNITS))]
    n = rng.randint(2, 40)
    phr = _pick(rng, ["Convert {n} {s} to {d}.", "How many {d} are in {n} {s}?",
                      "Express {n} {s} in {d}. Answer with a number only."])
    return phr.format(n=n, s=src, d=dst), "", str(n * factor)


def _sort_list(rng: random.Random) -> Task:
    nums = rng.sample(range(1, 100), rng.randint(4, 7))
    desc = rng.random() < 0.3
    order = "descending" if desc else "ascending"
    phr = _pick(rng, [f"Sort these numbers in {order} order.", f"Arrange the list in {order} order.",
                      f"Put the following numbers in {order} order, separated by commas."])
    return phr, ", ".join(map(str, nums)), ", ".join(map(str, sorted(nums, reverse=desc)))


def _string_manipulation(rng: random.Random) -> Task:
    word = _pick(rng, _WORDS)
    kind = rng.randrange(3)
    if kind == 0:
        phr = _pick(rng, ["Reverse the word '{w}'.", "Write '{w}' backwards.", "Spell '{w}' in reverse."])
        return phr.format(w=word), "", word[::-1]
    if kind == 1:
        phr = _pick(rng, ["Convert '{w}' to uppercase.", "Write the word '{w}' in capital letters."])
        return phr.format(w=word), "", word.upper()
    other = _pick(rng, _WORDS)
    return "Join the two words below with a hyphen.", f"{word} {other}", f"{word}-{other}"


def _counting(rng: random.Random) -> Task:
    kind = rng.randrange(2)
    if kind == 0:
        word = _pick(rng, _WORDS)
        letter = _pick(rng, sorted(set(word)))
        phr = _pick(rng, ["How many times does the letter '{l}' appear in '{w}'?",
                          "Count the occurrences of '{l}' in the word '{w}'."])
        return phr.format(l=letter, w=word), "", str(word.count(letter))
    words = [_pick(rng, _WORDS) for _ in range(rng.randint(3, 9))]
    phr = _pick(rng, ["How many words are in the sentence below?", "Count the words in this text."])
    return phr, " ".join(words), str(len(words))


def _weekday(rng: random.Random) -> Task:
    kind = rng.randrange(2)
    if kind == 0:
        start = rng.randrange(7)
        n = rng.randint(1, 20)
        phr = _pick(rng, ["If today is {d}, what day of the week will it be in {n} days?",
                          "Today is {d}. Which weekday is it {n} days from now?"])
        return phr.format(d=_WEEKDAYS[start], n=n), "", _WEEKDAYS[(start + n) % 7]
    day = dt.date(2000, 1, 1) + dt.timedelta(days=rng.randrange(365 * 40))
    phr = _pick(rng, ["On which day of the week did this date fall?", "Name the weekday of the date below."])
    return phr, day.isoformat(), _WEEKDAYS[day.weekday()]


def _python_function(rng: random.Random) -> Task:
    a, b, x = rng.randint(2, 9), rng.randint(1, 9), rng.randint(1, 12)
    kind = rng.randrange(3)
    if kind == 0:
        code, value = f"def f(x):\n    return {a} * x + {b}", a * x + b
    elif kind == 1:
        code, value = f"def f(x):\n    return x * x - {b}", x * x - b
    else:
        code, value = "def f(x):\n    return sum(range(x))", sum(range(x))
    phr = _pick(rng, [f"What does f({x}) return for the Python function below?",
                      f"Give the value of f({x}) for this function."])
    return phr, code, str(value)


def _json_format(rng: random.Random) -> Task:
    name, age = _pick(rng, _NAMES), rng.randint(18, 80)
    city = _pick(rng, [c for _, c in _CAPITALS])
    phr = _pick(rng, ["Write this information as a JSON object with keys name, age and city.",
                      "Format the details below as compact JSON with the keys name, age, city."])
    text = f"{name} is {age} years old and lives in {city}."
    return phr, text, json.dumps({"name": name, "age": age, "city": city})


def _antonym(rng: random.Random) -> Task:
    word, opposite = _ANTONYMS[rng.randrange(len(_ANTONYMS))]
    phr = _pick(rng, ["What is the opposite of '{w}'?", "Give an antonym of the word '{w}'.",
                      "Name the word that means the opposite of '{w}'."])
    return phr.format(w=word), "", opposite


def _capital(rng: random.Random) -> Task:
    country, city = _CAPITALS[rng.randrange(len(_CAPITALS))]
    phr = _pick(rng, ["What is the capital of {c}?", "Name the capital city of {c}.",
                      "Which city is the capital of {c}?"])
    return phr.format(c=country), "", city


def _comparison(rng: random.Random) -> Task:
    a, b = rng.sample(range(1, 1000), 2)
    kind = rng.randrange(2)
    if kind == 0:
        phr = _pick(rng, ["Which is larger, {a} or {b}?", "Which number is greater: {a} or {b}?"])
        return phr.format(a=a, b=b), "", str(max(a, b))
    phr = _pick(rng, ["Which of the two numbers is smaller?", "Pick the smaller number."])
    return phr, f"{a} and {b}", str(min(a, b))


def _sequence(rng: random.Random) -> Task:
    start, step = rng.randint(1, 20), rng.randint(2, 9)
    if rng.random() < 0.7:
        seq = [start + i * step for i in range(5)]
        nxt = start + 5 * step
    else:
        ratio = rng.randint(2, 3)
        seq = [start * ratio ** i for i in range(5)]
        nxt = start * ratio ** 5
    phr = _pick(rng, ["What number comes next in the sequence?", "Continue the sequence by one term.",
                      "Give the next number in this pattern."])
    return phr, ", ".join(map(str, seq)), str(nxt)


FAMILIES: dict[str, Callable[[random.Random], Task]] = {
    "arithmetic": _arithmetic,
    "unit_conversion": _unit_conversion,
    "sort_list": _sort_list,
    "string_manipulation": _string_manipulation,
    "counting": _counting,
    "weekday": _weekday,
    "python_function": _python_function,
    "json_format": _json_format,
    "antonym": _antonym,
    "capital": _capital,
    "comparison": _comparison,
    "sequence": _sequence,
}


def generate_suite(n: int = 1200, seed: int = 0, families: list[str] | None = None) -> list[dict]:
    """``n`` records, families in turn, each record in Alpaca layout with ``id`` and ``family``."""
    names = families or list(FAMILIES)
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown suite families {unknown}; known: {sorted(FAMILIES)}")
    rng = random.Random(seed)
    counts = dict.fromkeys(names, 0)
    records = []
    for i in range(n):
        family = names[i % len(names)]
        instruction, input_, output = FAMILIES[family](rng)
        records.append({"id": f"{family}-{counts[family]:05d}", "instruction": instruction,
                        "input": input_, "output": output, "family": family})
        counts[family] += 1
    return records


def suite_pool(n: int = 1200, seed: int = 0):
    """The generated suite as a validated ``Pool`` (Alpaca layout)."""
    return to_records(generate_suite(n, seed), None, FieldMap.for_layout("alpaca"), layout="alpaca")


def suite_tokenizer(vocab_size: int = 320, extra_special: list[str] | None = None, eos: str = "</s>"):
    """A small byte-level BPE tokenizer trained on 600 generated suite records: for tests and
    benchmarks that build models from configs and must not download a tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"] + (extra_special or [])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [" ".join((r["instruction"], r["input"], r["output"])) for r in generate_suite(600, seed=1)]
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos,
                                   unk_token="<unk>", pad_token="<pad>")
