"""Money amounts normalised to integer cents (plain Python, no Dagster)."""

from __future__ import annotations

import math
import re
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

MAX_AMOUNT = Decimal(10) ** 12
_MAX_TEXT = 64
_CURRENCY = re.compile(r"^\s*(?:€|eur\b)?\s*(?P<body>.*?)\s*(?:€|eur)?\s*$", re.IGNORECASE)
_DIGITS = re.compile(r"^[0-9]+$")
_CENT = Decimal("0.01")


class InvalidAmount(ValueError):
    """Raised when a value cannot be read as a non-negative money amount."""


def _from_decimal(value: Decimal) -> int:
    if not value.is_finite():
        raise InvalidAmount("not a finite number")
    if value < 0:
        raise InvalidAmount("negative amount")
    if value > MAX_AMOUNT:
        raise InvalidAmount("amount above 10^12")
    return int((value.quantize(_CENT, rounding=ROUND_HALF_UP) * 100).to_integral_value())


def _parse_grouped(integer: str, sep: str) -> str:
    """Digits of an integer part written with `sep` as thousands separator, or raise."""
    groups = integer.split(sep)
    if not (1 <= len(groups[0]) <= 3) or not all(len(g) == 3 for g in groups[1:]):
        raise InvalidAmount("malformed thousands grouping")
    if not all(_DIGITS.match(g) for g in groups):
        raise InvalidAmount("not a number")
    return "".join(groups)


def parse_amount_text(text: str) -> Decimal:
    """Read a German or English notation amount string such as '1.234,56 EUR' or '€ 1,234.56'."""
    if len(text) > _MAX_TEXT:
        raise InvalidAmount("amount text too long")
    match = _CURRENCY.match(text)
    body = match.group("body").replace("\u00a0", " ").strip() if match else ""
    if not body:
        raise InvalidAmount("no digits")
    if " " in body:
        raise InvalidAmount("not a number")
    has_dot, has_comma = "." in body, "," in body
    if has_dot and has_comma:
        decimal_sep = "," if body.rfind(",") > body.rfind(".") else "."
        thousands_sep = "." if decimal_sep == "," else ","
        integer, _, fraction = body.rpartition(decimal_sep)
        if not _DIGITS.match(fraction) or len(fraction) > 2 or decimal_sep in integer:
            raise InvalidAmount("not a number")
        digits = _parse_grouped(integer, thousands_sep)
        return Decimal(f"{digits}.{fraction}")
    if has_dot or has_comma:
        sep = "." if has_dot else ","
        parts = body.split(sep)
        if len(parts) == 2:
            integer, fraction = parts
            if not _DIGITS.match(integer) or not _DIGITS.match(fraction):
                raise InvalidAmount("not a number")
            if len(fraction) == 3:
                raise InvalidAmount(f"ambiguous: one '{sep}' followed by exactly three digits")
            if len(fraction) > 2:
                raise InvalidAmount("more than two decimal places")
            return Decimal(f"{integer}.{fraction}")
        # several separators of one kind: only valid as thousands grouping ("1.234.567")
        return Decimal(_parse_grouped(body, sep))
    if not _DIGITS.match(body):
        raise InvalidAmount("not a number")
    return Decimal(body)


def to_cents(value: Any) -> int:
    """Normalise a JSON/BSON amount to integer cents (half-up), or raise InvalidAmount."""
    if value is None:
        raise InvalidAmount("no amount")
    if isinstance(value, bool):
        raise InvalidAmount("boolean is not an amount")
    if isinstance(value, int):
        return _from_decimal(Decimal(value))
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise InvalidAmount("not a finite number")
        # repr gives the shortest string that round-trips, so 0.145 stays 0.145 (not 0.1449999...)
        return _from_decimal(Decimal(repr(value)))
    if isinstance(value, Decimal):
        return _from_decimal(value)
    if isinstance(value, str):
        return _from_decimal(parse_amount_text(value))
    to_decimal = getattr(value, "to_decimal", None)  # bson.Decimal128
    if callable(to_decimal):
        try:
            return _from_decimal(to_decimal())
        except InvalidOperation as exc:  # pragma: no cover - defensive
            raise InvalidAmount(str(exc)) from exc
    raise InvalidAmount(f"unsupported type {type(value).__name__}")


def try_cents(value: Any) -> tuple[int | None, str | None]:
    """(cents, None) for a valid amount, (None, reason) otherwise."""
    try:
        return to_cents(value), None
    except InvalidAmount as exc:
        return None, str(exc)
    except (InvalidOperation, ValueError, OverflowError) as exc:
        return None, f"not a number ({type(exc).__name__})"


def cents_to_float(cents: int) -> float:
    """The double the application stores in MongoDB for an amount in cents."""
    return float(Decimal(cents) / 100)
