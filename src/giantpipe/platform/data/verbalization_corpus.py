"""The embedded default translation corpus: English written form -> German spoken form.

Numbers, dates, times, amounts of money, ordinals, percentages, ages, temperatures and
measures appear in English carrier sentences as one writes them ("on May 3, 2021", "$12.50",
"at 7:45 PM", "the 3rd floor") and in German as one says them ("am dritten Mai
zweitausendeinundzwanzig", "zwölf Dollar fünfzig", "um neunzehn Uhr fünfundvierzig", "im dritten
Stock"), with German grammar (case endings of ordinals, ein/eine/einen, plurals, verb-final
and separable verbs) and its reorderings ("einundzwanzig", "halb acht", day before time).

Every English sentence has exactly one German translation, the vocabulary is small and
sentences have 4-25 words, so a small GNMT can learn it to a high BLEU. Generation is
deterministic given the seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from babel.dates import format_date

from giantpipe.platform.data.verbalization import (
    CITIES,
    DE_ARTICLE,
    DE_DAYS,
    EN_DAYS,
    NAMES,
    NOUNS,
    de_cardinal,
    de_count,
    de_date,
    de_ordinal,
    de_unit_count,
    de_year,
    en_count,
    en_date,
    en_number,
    en_ordinal,
    sample_count,
    sample_date,
    sample_money,
    sample_time,
)

CORPUS_VERSION = 1  # bump when the generated text changes: it keys the on-disk cache

# --- carrier sentences ---------------------------------------------------------------------
Template = Callable[[random.Random], tuple[str, str]]


def _pick(rng, items):
    return items[rng.randrange(len(items))]


def t_meeting_date(rng):
    d, year = sample_date(rng), rng.random() < 0.6
    subj = _pick(rng, [("meeting", "Die Besprechung"), ("party", "Die Feier"),
                       ("exam", "Die Prüfung"), ("wedding", "Die Hochzeit")])
    return f"The {subj[0]} is on {en_date(rng, d, year)}.", f"{subj[1]} ist am {de_date(d, year)}."


def t_arrive_date(rng):
    d, year = sample_date(rng), rng.random() < 0.5
    return (f"We will arrive in {(c := _pick(rng, CITIES))[0]} on {en_date(rng, d, year)}.",
            f"Wir werden am {de_date(d, year)} in {c[1]} ankommen.")


def t_born(rng):
    d, name = sample_date(rng), _pick(rng, NAMES)
    return f"{name} was born on {en_date(rng, d, True)}.", f"{name} wurde am {de_date(d, True)} geboren."


def t_postponed(rng):
    d, year = sample_date(rng), rng.random() < 0.4
    return (f"The concert was postponed to {en_date(rng, d, year)}.",
            f"Das Konzert wurde auf den {de_date(d, year)} verschoben.")


def t_until(rng):
    d = sample_date(rng)
    return (f"The shop is closed until {en_date(rng, d, False)}.",
            f"Das Geschäft ist bis zum {de_date(d, False)} geschlossen.")


def t_today(rng):
    d = sample_date(rng)
    en = format_date(d, "full", locale=_pick(rng, ["en_US", "en_GB"]))
    return f"Today is {en}.", f"Heute ist {DE_DAYS[d.weekday()]}, der {de_date(d, True, ending='')}."


def t_train_time(rng):
    en, de = sample_time(rng)
    return f"The train leaves at {en}.", f"Der Zug fährt um {de} ab."


def t_woke_time(rng):
    en, de = sample_time(rng)
    name = _pick(rng, NAMES)
    return f"{name} woke up at {en} today.", f"{name} ist heute um {de} aufgewacht."


def t_film_day_time(rng):
    en, de = sample_time(rng)
    day = rng.randrange(7)
    return (f"The film starts at {en} on {EN_DAYS[day]}.",
            f"Der Film beginnt am {DE_DAYS[day]} um {de}.")


def t_flight(rng):
    en_t, de_t = sample_time(rng)
    d, c = sample_date(rng), _pick(rng, CITIES)
    return (f"The flight to {c[0]} leaves at {en_t} on {en_date(rng, d, False)}.",
            f"Der Flug nach {c[1]} startet am {de_date(d, False)} um {de_t}.")


def t_costs(rng):
    en, de = sample_money(rng)
    noun = _pick(rng, NOUNS)
    return f"The {noun.en} costs {en}.", f"{DE_ARTICLE['nom'][noun.gender].capitalize()} {noun.de} kostet {de}."


def t_paid(rng):
    en, de = sample_money(rng)
    noun = _pick(rng, NOUNS)
    return (f"I paid {en} for the {noun.en}.",
            f"Ich habe {de} für {DE_ARTICLE['acc'][noun.gender]} {noun.de} bezahlt.")


def t_lend(rng):
    en, de = sample_money(rng)
    return f"Can you lend me {en}?", f"Kannst du mir {de} leihen?"


def t_paid_for_count(rng):
    en, de = sample_money(rng)
    n, noun, name = sample_count(rng), _pick(rng, NOUNS), _pick(rng, NAMES)
    return (f"{name} paid {en} for {en_count(rng, n, noun)}.",
            f"{name} hat für {de_count(n, noun)} {de} bezahlt.")


def t_bought(rng):
    n, noun = sample_count(rng), _pick(rng, NOUNS)
    return f"I bought {en_count(rng, n, noun)} yesterday.", f"Ich habe gestern {de_count(n, noun)} gekauft."


def t_on_table(rng):
    n, noun = sample_count(rng), _pick(rng, NOUNS)
    en_verb, de_verb = ("is", "liegt") if n == 1 else ("are", "liegen")
    return (f"There {en_verb} {en_count(rng, n, noun)} on the table.",
            f"Auf dem Tisch {de_verb} {de_count(n, noun, 'nom')}.")


def t_need(rng):
    n, noun = sample_count(rng), _pick(rng, NOUNS)
    return f"We need {en_count(rng, n, noun)} for the party.", f"Wir brauchen {de_count(n, noun)} für die Feier."


def t_floor(rng):
    n = rng.randint(1, 40)
    return f"Our office is on the {en_ordinal(rng, n)} floor.", f"Unser Büro ist im {de_ordinal(n)}n Stock."


def t_place(rng):
    n, name = rng.randint(1, 30), _pick(rng, NAMES)
    return f"{name} finished in {en_ordinal(rng, n)} place.", f"{name} landete auf dem {de_ordinal(n)}n Platz."


def t_visit(rng):
    n, c = rng.randint(2, 25), _pick(rng, CITIES)
    return f"This is my {en_ordinal(rng, n)} visit to {c[0]}.", f"Das ist mein {de_ordinal(n)}r Besuch in {c[1]}."


def t_century(rng):
    n = rng.randint(10, 21)
    return (f"The castle was built in the {en_ordinal(rng, n)} century.",
            f"Die Burg wurde im {de_ordinal(n)}n Jahrhundert gebaut.")


def t_anniversary(rng):
    n = rng.randint(2, 150)
    return (f"We celebrate the {en_ordinal(rng, n)} anniversary of the company.",
            f"Wir feiern den {de_ordinal(n)}n Jahrestag der Firma.")


def t_year_built(rng):
    y = rng.randint(1900, 2030)
    thing = _pick(rng, [("bridge", "Die Brücke"), ("school", "Die Schule"), ("house", "Das Haus"),
                        ("museum", "Das Museum")])
    return f"The {thing[0]} was built in {y}.", f"{thing[1]} wurde im Jahr {de_year(y)} gebaut."


def t_moved(rng):
    y, name, c = rng.randint(1950, 2030), _pick(rng, NAMES), _pick(rng, CITIES)
    return f"{name} moved to {c[0]} in {y}.", f"{name} ist im Jahr {de_year(y)} nach {c[1]} gezogen."


def t_age(rng):
    n, name = rng.randint(1, 99), _pick(rng, NAMES)
    years = "year" if n == 1 else "years"
    return (f"{name} is {en_number(rng, n)} {years} old.",
            f"{name} ist {de_unit_count(n)} {'Jahr' if n == 1 else 'Jahre'} alt.")


def t_percent(rng):
    p = rng.randint(1, 100)
    en = f"{p}%" if rng.random() < 0.5 else f"{en_number(rng, p)} percent"
    what = _pick(rng, [("Prices", "Die Preise"), ("Rents", "Die Mieten"), ("Sales", "Die Umsätze")])
    direction = _pick(rng, [("rose", "gestiegen"), ("fell", "gesunken")])
    return (f"{what[0]} {direction[0]} by {en} last year.",
            f"{what[1]} sind im letzten Jahr um {de_unit_count(p)} Prozent {direction[1]}.")


def t_temperature(rng):
    t = rng.randint(-20, 40)
    de = f"minus {de_unit_count(-t)}" if t < 0 else de_unit_count(t)
    unit = "degree" if abs(t) == 1 else "degrees"
    return f"It was {t} {unit} this morning.", f"Heute Morgen waren es {de} Grad."


def t_measure(rng):
    whole, tenth = rng.randint(0, 99), rng.randint(0, 9)
    en_unit, de_unit, en_tmpl, de_tmpl = _pick(rng, [
        ("kilometers", "Kilometer", "The trail is {} long.", "Der Weg ist {} lang."),
        ("kilograms", "Kilogramm", "The package weighs {}.", "Das Paket wiegt {}."),
        ("liters", "Liter", "The bottle holds {}.", "Die Flasche fasst {}."),
    ])
    if tenth or whole == 0:
        en, de = f"{whole}.{tenth} {en_unit}", f"{de_cardinal(whole)} Komma {de_cardinal(tenth)}"
    else:
        en = f"{whole} {en_unit[:-1] if whole == 1 else en_unit}"
        de = de_unit_count(whole)
    return en_tmpl.format(en), de_tmpl.format(f"{de} {de_unit}")


def t_platform(rng):
    en_t, de_t = sample_time(rng)
    c, n = _pick(rng, CITIES), rng.randint(1, 24)
    return (f"The train to {c[0]} leaves from platform {n} at {en_t}.",
            f"Der Zug nach {c[1]} fährt um {de_t} von Gleis {de_cardinal(n)} ab.")


def t_age_in_year(rng):
    n, y, name = rng.randint(2, 99), rng.randint(1950, 2030), _pick(rng, NAMES)
    return (f"{name} was {en_number(rng, n)} years old in {y}.",
            f"{name} war im Jahr {de_year(y)} {de_cardinal(n)} Jahre alt.")


def t_event(rng):
    d, (en_t, de_t) = sample_date(rng), sample_time(rng)
    n = rng.randint(1, 12)
    en_day = format_date(d, "full", locale=_pick(rng, ["en_US", "en_GB"]))
    return (f"The {en_ordinal(rng, n)} meeting of the year takes place on {en_day} at {en_t}.",
            f"Die {de_ordinal(n)} Besprechung des Jahres findet am {DE_DAYS[d.weekday()]}, dem "
            f"{de_date(d, True)} um {de_t} statt.")


def t_shopping_trip(rng):
    d, (en_m, de_m), c = sample_date(rng), sample_money(rng), _pick(rng, CITIES)
    n, noun, name = sample_count(rng), _pick(rng, NOUNS), _pick(rng, NAMES)
    return (f"On {en_date(rng, d, False)}, {name} paid {en_m} for {en_count(rng, n, noun)} in {c[0]}.",
            f"Am {de_date(d, False)} hat {name} in {c[1]} für {de_count(n, noun)} {de_m} bezahlt.")


def t_price_change(rng):
    d1, d2, p = sample_date(rng), sample_date(rng), rng.randint(1, 100)
    d1, d2 = min(d1, d2), max(d1, d2)
    return (f"Between {en_date(rng, d1, True)} and {en_date(rng, d2, True)}, prices rose by {p}%.",
            f"Zwischen dem {de_date(d1, True)} und dem {de_date(d2, True)} sind die Preise um "
            f"{de_unit_count(p)} Prozent gestiegen.")


TEMPLATES: list[Template] = [
    t_meeting_date, t_arrive_date, t_born, t_postponed, t_until, t_today, t_train_time,
    t_woke_time, t_film_day_time, t_flight, t_costs, t_paid, t_lend, t_paid_for_count, t_bought,
    t_on_table, t_need, t_floor, t_place, t_visit, t_century, t_anniversary, t_year_built,
    t_moved, t_age, t_percent, t_temperature, t_measure, t_platform, t_age_in_year, t_event,
    t_shopping_trip, t_price_change,
]


def generate_pairs(size: int, seed: int = 0) -> list[tuple[str, str]]:
    """`size` distinct (English, German) pairs, deterministic in `seed`, in generation order."""
    rng = random.Random(seed)
    seen: dict[str, str] = {}
    for _ in range(50 * size):
        if len(seen) >= size:
            break
        en, de = rng.choice(TEMPLATES)(rng)
        seen.setdefault(en, de)
    if len(seen) < size:
        raise ValueError(f"could only generate {len(seen)} distinct pairs, asked for {size}")
    return list(seen.items())
