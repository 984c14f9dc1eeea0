"""Numbers, dates, times and money as English writes them and German says them.

The building blocks of the embedded translation corpus (`verbalization_corpus`): num2words
spells the German numbers, babel's CLDR data gives month and day names and the English date
and currency formats. Samplers take a `random.Random`, so the corpus is deterministic.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from functools import cache

from babel.dates import format_date, get_day_names, get_month_names
from babel.numbers import format_currency
from num2words import num2words

EN_MONTHS = dict(get_month_names("wide", locale="en"))
DE_MONTHS = dict(get_month_names("wide", locale="de"))
EN_DAYS = dict(get_day_names("wide", locale="en"))
DE_DAYS = dict(get_day_names("wide", locale="de"))


@dataclass(frozen=True)
class Noun:
    en: str
    en_pl: str
    de: str
    de_pl: str
    gender: str  # "m", "f", "n"


# things one buys, has, needs
NOUNS = [
    Noun("apple", "apples", "Apfel", "Äpfel", "m"),
    Noun("pear", "pears", "Birne", "Birnen", "f"),
    Noun("book", "books", "Buch", "Bücher", "n"),
    Noun("ticket", "tickets", "Karte", "Karten", "f"),
    Noun("chair", "chairs", "Stuhl", "Stühle", "m"),
    Noun("egg", "eggs", "Ei", "Eier", "n"),
    Noun("bottle", "bottles", "Flasche", "Flaschen", "f"),
    Noun("letter", "letters", "Brief", "Briefe", "m"),
    Noun("glass", "glasses", "Glas", "Gläser", "n"),
    Noun("pencil", "pencils", "Bleistift", "Bleistifte", "m"),
    Noun("cup", "cups", "Tasse", "Tassen", "f"),
    Noun("table", "tables", "Tisch", "Tische", "m"),
    Noun("lamp", "lamps", "Lampe", "Lampen", "f"),
    Noun("bicycle", "bicycles", "Fahrrad", "Fahrräder", "n"),
    Noun("shirt", "shirts", "Hemd", "Hemden", "n"),
    Noun("key", "keys", "Schlüssel", "Schlüssel", "m"),
]
NAMES = ["Anna", "Peter", "Maria", "Thomas", "Laura", "Michael", "Julia", "David", "Lena", "Paul"]
CITIES = [("Berlin", "Berlin"), ("Munich", "München"), ("Vienna", "Wien"), ("Cologne", "Köln"),
          ("Hamburg", "Hamburg"), ("Zurich", "Zürich"), ("London", "London"), ("Rome", "Rom"),
          ("Paris", "Paris"), ("Prague", "Prag")]
CURRENCIES = {"USD": "Dollar", "EUR": "Euro", "GBP": "Pfund"}
EN_CURRENCY_WORDS = {"USD": ("dollar", "dollars", "cents"), "EUR": ("euro", "euros", "cents"),
                     "GBP": ("pound", "pounds", "pence")}
DE_ARTICLE = {"nom": {"m": "der", "f": "die", "n": "das"}, "acc": {"m": "den", "f": "die", "n": "das"}}
DE_ONE = {"nom": {"m": "ein", "f": "eine", "n": "ein"}, "acc": {"m": "einen", "f": "eine", "n": "ein"}}


@cache
def de_cardinal(n: int) -> str:
    return num2words(n, lang="de")


@cache
def de_ordinal(n: int) -> str:
    """Stem of the ordinal with the weak ending -e ("dritte"); callers add "n" or "r"."""
    return num2words(n, lang="de", to="ordinal")


@cache
def de_year(year: int) -> str:
    return num2words(year, lang="de", to="year")


def de_unit_count(n: int) -> str:
    """A cardinal before an invariant unit noun: "ein Euro", "zwei Euro", "einundzwanzig Euro"."""
    return "ein" if n == 1 else de_cardinal(n)


def de_count(n: int, noun: Noun, case: str = "acc") -> str:
    if n == 1:
        return f"{DE_ONE[case][noun.gender]} {noun.de}"
    return f"{de_cardinal(n)} {noun.de_pl}"


def en_number(rng: random.Random, n: int, words: float = 0.3) -> str:
    return num2words(n, lang="en") if n < 100 and rng.random() < words else str(n)


def en_ordinal(rng: random.Random, n: int, words: float = 0.4) -> str:
    return num2words(n, lang="en", to="ordinal" if rng.random() < words else "ordinal_num")


def en_count(rng: random.Random, n: int, noun: Noun) -> str:
    return f"{en_number(rng, n)} {noun.en if n == 1 else noun.en_pl}"


def sample_count(rng: random.Random) -> int:
    n = rng.randint(1, 20) if rng.random() < 0.7 else rng.randint(21, 999)
    return n if n < 100 or n % 100 != 1 else n + 1  # avoid "hundertein(s)" noun agreement


# --- dates ---------------------------------------------------------------------------------
def sample_date(rng: random.Random) -> dt.date:
    return dt.date(rng.randint(1950, 2035), 1, 1) + dt.timedelta(days=rng.randint(0, 364))


def en_date(rng: random.Random, d: dt.date, year: bool) -> str:
    day, month = d.day, EN_MONTHS[d.month]
    style = rng.randrange(5)
    if style == 0:
        return format_date(d, "medium", locale="en_US") if year else f"{month} {day}"
    if style == 1:
        return format_date(d, "medium", locale="en_GB") if year else f"{day} {month}"
    if style == 2:
        return f"{month} {num2words(day, lang='en', to='ordinal_num')}" + (f", {d.year}" if year else "")
    return f"the {en_ordinal(rng, day, words=0.5)} of {month}" + (f" {d.year}" if year else "")


def de_date(d: dt.date, year: bool, ending: str = "n") -> str:
    """'dritten Mai zweitausendeinundzwanzig' (ending "n": after am/zum/den) or 'dritte Mai ...'."""
    text = f"{de_ordinal(d.day)}{'n' if ending == 'n' else ''} {DE_MONTHS[d.month]}"
    return f"{text} {de_year(d.year)}" if year else text


# --- times ---------------------------------------------------------------------------------
def sample_time(rng: random.Random) -> tuple[str, str]:
    """An English clock time and its German spoken form (without "um")."""
    style = rng.randrange(5)
    if style <= 1:  # 12-hour clock with AM/PM -> German 24-hour clock
        h12, minute = rng.randint(1, 12), rng.choice([0, 0, rng.randint(1, 59)])
        pm = rng.random() < 0.5
        suffix = rng.choice(["PM", "pm", "p.m."]) if pm else rng.choice(["AM", "am", "a.m."])
        h24 = (h12 % 12) + (12 if pm else 0)
        en = f"{h12}:{minute:02d} {suffix}" if minute or rng.random() < 0.5 else f"{h12} {suffix}"
        return en, de_clock(h24, minute)
    if style == 2:  # 24-hour clock
        h, minute = rng.randint(0, 23), rng.randint(0, 59)
        return f"{h}:{minute:02d}", de_clock(h, minute)
    if style == 3:  # o'clock
        h = rng.randint(1, 12)
        return f"{en_number(rng, h, words=0.5)} o'clock", de_clock(h, 0)
    h = rng.randint(1, 12)  # quarter past, half past, quarter to: German counts to the next hour
    nxt = h % 12 + 1
    kind = rng.randrange(3)
    h_en = en_number(rng, h, words=0.6)
    nxt_en = en_number(rng, nxt, words=0.6)
    if kind == 0:
        return f"a quarter past {h_en}", f"Viertel nach {de_cardinal(h)}"
    if kind == 1:
        return f"half past {h_en}", f"halb {de_cardinal(nxt)}"
    return f"a quarter to {nxt_en}", f"Viertel vor {de_cardinal(nxt)}"


def de_clock(hour: int, minute: int) -> str:
    text = f"{de_unit_count(hour)} Uhr"
    return f"{text} {de_cardinal(minute)}" if minute else text


# --- money ---------------------------------------------------------------------------------
def sample_money(rng: random.Random) -> tuple[str, str]:
    code = rng.choice(list(CURRENCIES))
    units = rng.randint(1, 20) if rng.random() < 0.5 else rng.randint(21, 2500)
    cents = 0 if rng.random() < 0.4 else rng.randint(2, 99)
    de = f"{de_unit_count(units)} {CURRENCIES[code]}" + (f" {de_cardinal(cents)}" if cents else "")
    style = rng.randrange(3)
    if style == 0 or (style == 1 and cents):
        en = format_currency(units + cents / 100, code, locale="en_US")
        if not cents and rng.random() < 0.5:
            en = en[:-3]  # "$12" as well as "$12.00"
    else:
        one, many, hundredths = EN_CURRENCY_WORDS[code]
        en = f"{en_number(rng, units)} {one if units == 1 else many}"
        if cents:
            en += f" and {en_number(rng, cents)} {hundredths}"
    return en.replace("\xa0", " "), de
