"""Turn raw extracts (PostgreSQL rows, MongoDB documents) into the narrow frames the diff compares.

Amounts arrive as (JSON type, text) pairs: PostgreSQL extracts them with `json_typeof` and `->>`,
MongoDB values are described the same way, so one vectorised path turns the common shapes into
integer cents and only unusual text goes through `amounts.try_cents` one value at a time.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd

from reconciliation_pipeline.core import keys
from reconciliation_pipeline.core.amounts import MAX_AMOUNT, try_cents

MISSING = "\x00<creditor_response_amount absent>"  # marker for a missing field (distinct from null)
UNPARSABLE = "unparsable"  # type given to every field of extracted_data that could not be parsed

EMAIL_COLUMNS = ["email_id", "from_email", "received_at", "created_at", "in_window", "extracted_json"]
TYPED_COLUMNS = ["az_type", "az_text", "client_name", "creditor_name", "amount_type", "amount_text"]
_MAX_CENTS = int(MAX_AMOUNT) * 100


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(text: Any) -> dict | None:
    """The JSON object in `text`, or None when it is not an object (numbers stay exact Decimals)."""
    if not isinstance(text, str):
        return text if isinstance(text, dict) else None
    try:
        value = json.loads(text, parse_float=Decimal, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def json_type_and_text(value: Any) -> tuple[str | None, str | None]:
    """(json_typeof, ->> text) of a Python value the way PostgreSQL reports a JSON value."""
    if value is MISSING:
        return None, None
    if value is None:
        return "null", None
    if isinstance(value, bool):
        return "boolean", "true" if value else "false"
    if isinstance(value, (int, Decimal)):
        return "number", str(value)
    if isinstance(value, float):
        return ("number", repr(value)) if math.isfinite(value) else ("invalid", repr(value))
    if isinstance(value, str):
        return "string", value
    if isinstance(value, dict):
        return "object", None
    if isinstance(value, list):
        return "array", None
    to_decimal = getattr(value, "to_decimal", None)  # bson.Decimal128
    if callable(to_decimal):
        return "number", str(to_decimal())
    return "invalid", None


def _typed_from_json(texts: pd.Series) -> pd.DataFrame:
    """TYPED_COLUMNS from extracted_data text, parsed in Python (tests, and rows PostgreSQL can't split)."""
    rows = []
    for text in texts:
        data = parse_json_object(text)
        if data is None:  # e.g. nested deeper than Python's parser goes: say so, don't guess
            rows.append((UNPARSABLE, None, None, None, UNPARSABLE, None))
            continue
        az_type, az_text = json_type_and_text(data.get("client_aktenzeichen", MISSING))
        amount_type, amount_text = json_type_and_text(data.get("debt_amount", MISSING))
        name, creditor = data.get("client_name"), data.get("creditor_name")
        rows.append((az_type, az_text, name if isinstance(name, str) else None,
                     creditor if isinstance(creditor, str) else None, amount_type, amount_text))
    return pd.DataFrame(rows, columns=TYPED_COLUMNS, index=texts.index, dtype=object)


def cents_from_typed(types: pd.Series, texts: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(cents as Int64, reason) for amounts given as (JSON type, text), vectorised for common shapes.

    Numbers like 1234.56 and strings like "1234.56" take an exact integer path (half-up on the
    third decimal); everything else goes through amounts.try_cents, once per distinct value.
    """
    types = types.astype(object)
    texts = texts.astype(object)
    n = len(types)
    cents = np.zeros(n, dtype=np.int64)
    valid = np.zeros(n, dtype=bool)
    reasons = np.full(n, None, dtype=object)
    is_number = (types == "number").to_numpy(bool)
    is_string = (types == "string").to_numpy(bool)
    text_values = texts.to_numpy(object)
    for mask, max_decimals in ((is_number, None), (is_string, 2)):
        if not mask.any():
            continue
        idx = np.flatnonzero(mask)
        ok, value = _plain_decimal_cents(text_values[idx], max_decimals)
        in_range = value <= _MAX_CENTS
        target = idx[ok]
        cents[target[in_range]] = value[in_range]
        valid[target[in_range]] = True
        reasons[target[~in_range]] = "amount above 10^12"
    slow = np.flatnonzero((is_number | is_string) & ~valid & pd.isna(reasons))
    cache: dict[tuple[Any, Any], tuple[int | None, str | None]] = {}
    type_values, text_values = types.to_numpy(object), texts.to_numpy(object)
    for i in slow:
        key = (type_values[i], text_values[i])
        if key not in cache:
            value = text_values[i]
            if key[0] == "number":
                try:
                    value = Decimal(value)
                except ArithmeticError:
                    cache[key] = (None, "not a number")
                    continue
            cache[key] = try_cents(value)
        c, reason = cache[key]
        if c is None:
            reasons[i] = reason
        else:
            cents[i], valid[i] = c, True
    other = ~(is_number | is_string)
    missing = pd.isna(types).to_numpy(bool)
    reasons[other & missing] = "no amount"
    for kind, reason in (("null", "no amount"), ("boolean", "boolean is not an amount"), ("object", "an object is not an amount"),
                         ("array", "a list is not an amount"), ("invalid", "not a finite number"),
                         (UNPARSABLE, "extracted_data could not be parsed")):
        reasons[(types == kind).to_numpy(bool)] = reason
    out = pd.array(np.where(valid, cents, 0), dtype="Int64")
    out[~valid] = pd.NA
    return pd.Series(out, index=types.index), pd.Series(reasons, index=types.index, dtype="string")


def _plain_decimal_cents(values: np.ndarray, max_decimals: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(ok, cents of the ok ones) for texts of ASCII digits with an optional '.' and decimals
    (`[0-9]{1,13}(.[0-9]+)?`, at most `max_decimals` decimals when given), half-up on the third
    decimal. numpy's byte-string functions do it in C; texts with other characters are simply not ok."""
    n = len(values)
    lengths = np.fromiter((len(v) if isinstance(v, str) else 0 for v in values), dtype=np.int64, count=n)
    short = np.flatnonzero((lengths > 0) & (lengths <= 64))
    ok = np.zeros(n, dtype=bool)
    cents = np.zeros(n, dtype=np.int64)
    if not len(short):
        return ok, cents[ok]
    try:
        encoded = values[short].astype("S64")
    except UnicodeEncodeError:  # some text is not ASCII: those are never plain digits, test one by one
        ascii_only = np.fromiter((v.isascii() for v in values[short]), dtype=bool, count=len(short))
        short = short[ascii_only]
        if not len(short):
            return ok, cents[ok]
        encoded = values[short].astype("S64")
    whole, dot, decimals = (part.astype("S64") for part in np.strings.partition(encoded, b"."))  # never S0: numpy mis-indexes it
    whole_len, decimals_len = np.strings.str_len(whole), np.strings.str_len(decimals)
    good = (whole_len >= 1) & (whole_len <= 13) & np.strings.isdigit(whole)
    good &= (dot == b"") | ((decimals_len >= 1) & np.strings.isdigit(decimals))
    if max_decimals is not None:
        good &= decimals_len <= max_decimals
    whole, decimals = whole[good], decimals[good]
    value = whole.astype(np.int64) * 100 + np.strings.slice(np.strings.add(decimals, b"00"), 0, 2).astype(np.int64)
    value += np.strings.slice(decimals, 2, 3) >= b"5"
    ok[short[good]] = True
    cents[short[good]] = value
    return ok, cents[ok]


def add_email_keys(raw: pd.DataFrame) -> pd.DataFrame:
    """Keys from from_email, client_aktenzeichen (or az_type/az_text), client_name, creditor_name.

    Only the keys every email needs are built here; the name and creditor-name keys are built in
    the diff for the few emails that need them.
    """
    out = raw.copy()
    out["from_email_key"] = keys.email_key(raw["from_email"])
    if "az_type" in raw:
        az = raw["az_text"].where(raw["az_type"] == "string")
        out["az_key"], out["az_reason"] = keys.aktenzeichen_key(az.astype(object))
        bad_type = raw["az_type"].notna() & ~raw["az_type"].isin(["string", "null", UNPARSABLE])
        out["az_reason"] = out["az_reason"].mask(bad_type, "client_aktenzeichen is not a plain string")
        out["az_reason"] = out["az_reason"].mask(raw["az_type"] == UNPARSABLE, "extracted_data could not be parsed")
    else:
        out["az_key"], out["az_reason"] = keys.aktenzeichen_key(raw["client_aktenzeichen"])
    for column in ("client_name", "creditor_name"):
        values = raw[column].astype(object)
        out[column] = values.where(pd.Series([isinstance(v, str) for v in values], index=values.index, dtype=bool))
    return out


def prepare_emails(rows: pd.DataFrame) -> pd.DataFrame:
    """Typed extracted_data fields (or the JSON text) -> comparison keys and the amount in cents."""
    if rows.empty:
        rows = pd.DataFrame({c: pd.Series(dtype="object") for c in EMAIL_COLUMNS + TYPED_COLUMNS})
    if "az_type" not in rows:
        typed = _typed_from_json(rows["extracted_json"])
    else:
        typed = rows[TYPED_COLUMNS].astype(object)
        unsafe = rows["extracted_json"].notna() if "extracted_json" in rows else pd.Series(False, index=rows.index)
        if unsafe.any():  # rows PostgreSQL could not split (a \u0000 escape): parse them here
            typed.loc[unsafe] = _typed_from_json(rows.loc[unsafe, "extracted_json"])
    raw = pd.DataFrame(
        {
            "email_id": rows["email_id"].astype("int64"),
            "in_window": rows["in_window"].astype(bool),
            "received_at": pd.to_datetime(rows["received_at"], utc=True),
            "from_email": rows["from_email"].astype(object),
            "az_type": typed["az_type"],
            "az_text": typed["az_text"],
            "client_name": typed["client_name"],
            "creditor_name": typed["creditor_name"],
        },
        index=rows.index,
    )
    out = add_email_keys(raw).drop(columns=["az_type", "az_text", "from_email"])
    out["amount_cents"], out["amount_reason"] = cents_from_typed(typed["amount_type"], typed["amount_text"])
    return share_strings(out.reset_index(drop=True))


SHARED_STRING_COLUMNS = ("from_email_key", "az_key", "az_reason", "client_name", "creditor_name", "amount_reason")


def held_once(values: np.ndarray, normalise: Any = None) -> np.ndarray:
    """`values` (object) with each distinct value held once, `normalise` (a Series -> Series map)
    applied once per distinct value; None stays None."""
    codes, uniques = pd.factorize(values)
    distinct = np.asarray(uniques, dtype=object)
    if normalise is not None:
        distinct = normalise(pd.Series(distinct, dtype=object)).to_numpy(object)
    out = np.full(len(values), None, dtype=object)
    present = codes >= 0
    out[present] = distinct[codes[present]]
    return out


def share_strings(frame: pd.DataFrame, columns: Iterable[str] = SHARED_STRING_COLUMNS) -> pd.DataFrame:
    """The frame with each distinct string of `columns` held once (a million emails repeat a few
    thousand creditor addresses): 8 bytes a row instead of a string object a row; values unchanged."""
    out = frame.copy(deep=False)
    for column in columns:
        if column not in out or not len(out):
            continue
        values = out[column]
        shared = held_once(values.to_numpy(object))
        out[column] = pd.array(shared, dtype=values.dtype) if isinstance(values.dtype, pd.StringDtype) else shared
    return out


def prepare_clients(documents: Iterable[Mapping]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(clients, creditor elements) frames from MongoDB client documents."""
    docs = list({str(d["_id"]): d for d in documents}.values())
    clients = pd.DataFrame(
        [(str(d["_id"]), d.get("aktenzeichen"), d.get("firstName"), d.get("lastName")) for d in docs],
        columns=["client_id", "aktenzeichen", "first", "last"], dtype=object,
    )
    clients["az_key"], _ = keys.aktenzeichen_key(clients["aktenzeichen"])
    clients["name_key"] = keys.person_name_key(clients["first"], clients["last"])
    clients = clients.drop(columns=["first", "last"])

    records = [
        (cid, i, e.get("sender_email"), e.get("sender_name"), e.get("creditor_response_amount", MISSING),
         e.get("amount_source"), e.get("response_received_at"))
        for cid, creditors in ((str(d["_id"]), d.get("final_creditor_list")) for d in docs)
        if isinstance(creditors, list)
        for i, e in enumerate(c if isinstance(c, Mapping) else {} for c in creditors)
    ]
    elements = pd.DataFrame(
        records,
        columns=["client_id", "pos", "observed_sender_email", "observed_sender_name", "mongo_raw", "amount_source", "response_received_at"],
        dtype=object,
    )
    elements["pos"] = elements["pos"].astype("int64")
    elements["sender_email_key"] = keys.email_key(elements["observed_sender_email"])
    elements["mongo_missing"], elements["mongo_cents"], elements["mongo_reason"] = mongo_amounts(elements["mongo_raw"])
    elements["response_received_at"] = utc_times(elements["response_received_at"])
    return clients, elements


def mongo_amounts(raw: pd.Series) -> tuple[np.ndarray, pd.Series, pd.Series]:
    """(missing, cents as Int64, reason) for creditor_response_amount values as MongoDB returns them.

    Plain floats and ints (almost all of them) take a numpy path: a float whose value times 100 lies
    within 1e-6 of a whole number has at most two decimals in its shortest repr (or rounds to the
    same cent half-up), so rint() is exact there; everything else goes the (type, text) way.
    """
    values = raw.to_numpy(object)
    n = len(values)
    kind = np.fromiter((_VALUE_KIND.get(type(v), 0) for v in values), dtype=np.int8, count=n)
    missing = np.fromiter((v is MISSING or v is None for v in values), dtype=bool, count=n)
    cents = np.zeros(n, dtype=np.int64)
    valid = np.zeros(n, dtype=bool)
    floats = np.flatnonzero(kind == 1)
    if len(floats):
        f = values[floats].astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            scaled = f * 100
            whole = np.rint(scaled)
            ok = np.isfinite(f) & ((f > 0) | ((f == 0) & ~np.signbit(f))) & (np.abs(scaled - whole) < 1e-6) & (whole <= _MAX_CENTS)
        cents[floats[ok]] = whole[ok].astype(np.int64)
        valid[floats[ok]] = True
    ints = np.flatnonzero(kind == 2)
    if len(ints):
        small = np.array([0 <= v <= _MAX_CENTS // 100 for v in values[ints]], dtype=bool)
        cents[ints[small]] = np.array([v * 100 for v in values[ints[small]]], dtype=np.int64)
        valid[ints[small]] = True
    out = pd.array(cents, dtype="Int64")
    out[~valid] = pd.NA
    reasons = pd.Series(pd.NA, index=raw.index, dtype="string")
    slow = np.flatnonzero(~valid & ~missing)
    if len(slow):
        typed = [json_type_and_text(v) for v in values[slow]]
        slow_cents, slow_reasons = cents_from_typed(pd.Series([t for t, _ in typed], dtype=object), pd.Series([x for _, x in typed], dtype=object))
        out[slow] = slow_cents.to_numpy()
        reasons.iloc[slow] = slow_reasons.to_numpy()
    return missing, pd.Series(out, index=raw.index), reasons


_VALUE_KIND = {float: 1, int: 2}
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
_NAT = np.iinfo(np.int64).min


def _micros(value: Any) -> int:
    if not isinstance(value, datetime):
        return _NAT
    aware = value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)  # naive BSON dates are UTC
    return (aware - _EPOCH) // _MICROSECOND


def utc_times(values: pd.Series) -> pd.Series:
    """Datetimes (aware, or naive meaning UTC) as datetime64[us, UTC]; anything else NaT."""
    micros = np.fromiter((_micros(v) for v in values.to_numpy(object)), dtype=np.int64, count=len(values))
    return pd.Series(micros.view("datetime64[us]"), index=values.index).dt.tz_localize("UTC")
