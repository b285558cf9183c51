"""Units of the spec language and their conversion to vsc's base units.

A quantity is written NUMBER UNIT (`200 ms`, `4GiB`, `8 req/s`). Every unit belongs
to one kind, and each kind has one base unit that the AST stores:

    time        us, ms, s                   -> seconds (float)
    size        B, KB, MB, GB, TB,
                KiB, MiB, GiB, TiB          -> bytes (int)
    rate        req/s                       -> requests per second (float)
    throughput  tok/s                       -> tokens per second (float)

Conversion goes through `fractions.Fraction`, so `200 ms` is exactly the float
nearest to 0.2 and `1.5 GiB` is an exact number of bytes.
"""
from __future__ import annotations

import math
from fractions import Fraction

TIME = "time"
SIZE = "size"
RATE = "rate"
THROUGHPUT = "throughput"

# unit -> (kind, how many base units one of it is)
UNITS: dict[str, tuple[str, Fraction]] = {
    "us": (TIME, Fraction(1, 1_000_000)),
    "ms": (TIME, Fraction(1, 1_000)),
    "s": (TIME, Fraction(1)),
    "B": (SIZE, Fraction(1)),
    "KiB": (SIZE, Fraction(2**10)),
    "MiB": (SIZE, Fraction(2**20)),
    "GiB": (SIZE, Fraction(2**30)),
    "TiB": (SIZE, Fraction(2**40)),
    "KB": (SIZE, Fraction(10**3)),
    "MB": (SIZE, Fraction(10**6)),
    "GB": (SIZE, Fraction(10**9)),
    "TB": (SIZE, Fraction(10**12)),
    "req/s": (RATE, Fraction(1)),
    "tok/s": (THROUGHPUT, Fraction(1)),
}

# How a kind reads in a sentence: "'200 kg' is not a time".
KIND_NOUNS = {
    TIME: "a time",
    SIZE: "a size",
    RATE: "a request rate",
    THROUGHPUT: "a token throughput",
}

# The units named in messages, in the order a user would want to read them.
_SUGGESTED = {
    TIME: ["ms", "s", "us"],
    SIZE: ["B", "KiB", "MiB", "GiB", "KB", "MB", "GB"],
    RATE: ["req/s"],
    THROUGHPUT: ["tok/s"],
}


class UnitError(ValueError):
    """A quantity whose unit is unknown or of the wrong kind; the message is user-facing."""


def unit_kind(unit: str) -> str | None:
    """The kind of `unit` ("time", "size", ...), or None when vsc does not know it."""
    entry = UNITS.get(unit)
    return entry[0] if entry else None


def units_of(kind: str) -> list[str]:
    """Every unit of `kind`, as written in a spec."""
    return [u for u, (k, _) in UNITS.items() if k == kind]


def describe_units(kind: str) -> str:
    """'ms, s or us': the units of `kind` for an error message."""
    names = _SUGGESTED[kind]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def format_quantity(number: int | float | str, unit: str) -> str:
    return f"{number} {unit}"


def convert(number: int | float, unit: str, kind: str, text: str | None = None) -> int | float:
    """`number unit` in the base unit of `kind`: int bytes for sizes, float otherwise.

    Raises UnitError when the unit is unknown or measures something else; `text`
    (the number as the user wrote it) is used in that message.
    """
    if kind not in KIND_NOUNS:
        raise ValueError(f"unknown unit kind {kind!r}")
    shown = format_quantity(text if text is not None else number, unit)
    entry = UNITS.get(unit)
    if entry is None or entry[0] != kind:
        hint = f"use {describe_units(kind)}"
        if entry is None:
            same_letters = [u for u in units_of(kind) if u.lower() == unit.lower()]
            if same_letters:
                hint = f"did you mean '{same_letters[0]}'?"
        raise UnitError(f"'{shown}' is not {KIND_NOUNS[kind]} ({hint})")
    if not math.isfinite(number):
        raise UnitError(f"'{shown}' is out of range")
    value = Fraction(number) * entry[1]
    if kind == SIZE:
        return round(value)
    return float(value)
