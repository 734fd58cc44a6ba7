"""Synthetic application data for benchmarks and load tests, loaded fast.

`generate(engine, mongo_db, ...)` empties the application's tables and the portal's `clients`
collection and loads a consistent data set with a known amount of planted drift:

* PostgreSQL (`COPY ... FROM STDIN` through psycopg 3): `incoming_emails` spread over the 48 hours
  before `window_end`, `outbox_messages` (pending deliverable, poison, undeliverable, old
  processed) and `idempotency_keys` (half expired).
* MongoDB (`insert_many`, 1,000 documents a batch, unordered): one document per client with
  `creditors_per_client` creditor elements; the answered elements hold the amount of the pair's
  newest email as a double.

Then `drift` x (pairs with an email) pairs are perturbed, split over the kinds in `KINDS`; the
returned dict says how many of each were planted, which is exactly what a reconciliation run of a
window covering all rows must find (after the outbox retry has delivered the pending messages).

Layout of the data (everything vectorised with numpy; only the MongoDB documents and a few small
columns are built per row in Python):

* client `i`: aktenzeichen `str(100000 + i)`, a (firstName, lastName) pair unique while
  `clients <= 192,000`, creditors drawn without repetition from a pool of ~1,500 creditors.
* each regular email picks a (client, creditor) pair at random (so ~1/e of the pairs have no email
  when emails == pairs); 95 % name the creditor's own address (match level 1), 3 % a `noreply@`
  address of its domain with the exact name (level 2), 2 % a `service@` address with a longer name
  (level 3). Amounts are mostly JSON numbers, 10 % German/English strings; client_name mostly
  "Last, First", 10 % "First Last"; a few emails carry only the client's name.
* 2 % noise rows that the window query must skip (pending, not_applicable, NULL extracted_data,
  synced without debt_amount).
"""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import sqlalchemy as sa

KINDS = (
    "data_mismatch", "missing_in_mongo", "invalid_mongo_amount", "client_not_found",
    "creditor_not_found", "invalid_pg_amount", "extra_in_mongo",
)
KIND_WEIGHTS = (0.30, 0.20, 0.10, 0.10, 0.10, 0.10, 0.10)
REPAIRABLE = ("data_mismatch", "missing_in_mongo")
LOOKBACK = timedelta(hours=48)
MONGO_BATCH = 1_000
PG_CHUNK = 100_000
AZ_BASE = 100_000
BOGUS_AZ_BASE = 90_000_000
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

FIRST_NAMES = (
    "Max Anna Jürgen Björn Sören Günther Käthe Jörg Müge Özlem Lena Paul Sophie Felix Emma Jonas Mia Leon Hannah "
    "Lukas Lea Tim Laura Jan Sarah Niklas Julia Tobias Lisa David Marie Simon Katharina Florian Johanna Philipp "
    "Clara Moritz Nele Fabian Amelie Sebastian Greta Dominik Ida Matthias Frieda Stefan Helene Andreas Luise Thomas "
    "Ruth Michael Ilse Frank Gisela Uwe Renate Dieter Ursula Klaus Monika Wolfgang Brigitte Horst Erika Bernd "
    "Sabine Ralf Petra Heike Dirk Anke Kai Silke Timo Nadine"
).split()
LAST_PREFIXES = (
    "Berg Brink Busch Dreh Eich Feld Fisch Grün Hage Hof Holz Kamp Kirch Kling Kröger Lind Mahl Mühl Neu Ober "
    "Pfeif Rein Ross Sand Schön Schul Stein Stroh Thal Vogel Wald Weide Wester Wies Winkel Wolf Zimmer Böhm "
    "Brenn Dorn Eggers Frei Gold Hart Horn Kessel Knapp Lang Moor Nord Ost Quell Rinn Sauer Seel Sonn Tann "
    "Ulm Wend Zorn"
).split()
LAST_SUFFIXES = (
    "mann er hoff bauer meier müller schmidt hausen kamp berg feld holz stein brink hardt wald hagen dorf rath "
    "beck mayr huber lein ner ling hofer gruber brand reiter wirth born bach heim stedt kötter lage mund horst "
    "wig ke"
).split()
CREDITOR_KINDS = (
    "Sparkasse", "Volksbank", "Stadtwerke", "Telekom Inkasso", "Vodafone Forderungen", "Creditreform",
    "Allianz Versicherung", "Ergo Versicherung", "Santander Consumer", "Targobank", "Postbank", "Commerzbank",
    "Deutsche Bank Filiale", "Otto Versand", "Klarna Zahlungen", "Barmer Krankenkasse", "AOK Beitragsstelle",
    "Finanzamt", "Vattenfall Energie", "Hausverwaltung Becker", "Autohaus Schröder", "Zahnarztpraxis Dr. Yilmaz",
    "Fitnessstudio Kraftwerk", "Mobilfunk Service", "Inkasso Nordwest", "Versandhaus Baur", "Rechtsanwälte Kühn",
    "Wohnungsbau eG", "Energieversorgung", "Kreditbank",
)
CITIES = (
    "Bochum Essen Dortmund Köln Düsseldorf München Nürnberg Augsburg Stuttgart Freiburg Mannheim Karlsruhe "
    "Frankfurt Wiesbaden Mainz Kassel Hannover Braunschweig Göttingen Bremen Hamburg Kiel Lübeck Rostock "
    "Schwerin Berlin Potsdam Leipzig Dresden Chemnitz Erfurt Jena Magdeburg Halle Münster Bielefeld Osnabrück "
    "Paderborn Aachen Bonn Koblenz Trier Saarbrücken Würzburg Regensburg Passau Ulm Konstanz Oldenburg Gelsenkirchen"
).split()
# Amounts the diff must call invalid (RULES.md section 2), as JSON text for PostgreSQL and raw values for MongoDB.
INVALID_PG_JSON = ('"1.234"', '"unbekannt"', '-12.5', '"12,345 EUR"', 'true', '"1.2.3,45"')
INVALID_MONGO_VALUES = ("unbekannt", "1.234", -25.0, "n/a", "12,5,0")


# --- small helpers ------------------------------------------------------------------------------

def _slug(text: str) -> str:
    text = text.lower()
    for a, b in (("ä", "ae"), ("ö", "oe"), ("ü", "ue"), ("ß", "ss")):
        text = text.replace(a, b)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "-".join("".join(c if c.isalnum() else " " for c in text).split())


def _obj(values: Any) -> np.ndarray:
    """An object array of Python str (numpy's + on object arrays concatenates element-wise in C)."""
    if isinstance(values, np.ndarray) and values.dtype == object:
        return values
    return np.asarray(values).astype(str).astype(object)


def _ts_text(seconds: np.ndarray) -> np.ndarray:
    """Epoch seconds as PostgreSQL timestamptz text (UTC)."""
    return _obj(np.datetime_as_string(seconds.astype("datetime64[s]"), unit="s")) + "+00"


def _amount_number_text(cents: np.ndarray) -> np.ndarray:
    """Cents as JSON number text: 1234.56 (always two decimals)."""
    return _obj(cents // 100) + "." + _obj(np.char.zfill((cents % 100).astype(str), 2))


def _amount_string(cents: int, style: int) -> str:
    euros, ct = divmod(int(cents), 100)
    if style == 0:
        return f"{euros:,}".replace(",", ".") + f",{ct:02d}"  # 1.234,56
    if style == 1:
        return f"{euros},{ct:02d} EUR"  # 1234,56 EUR
    if style == 2:
        return f"€ {euros:,}.{ct:02d}"  # € 1,234.56
    return f"{euros}.{ct:02d}"  # "1234.56"


def _split_counts(total: int, weights: tuple[float, ...], at_least_one: bool) -> list[int]:
    """Largest-remainder split of `total`, every share >= 1 when asked (and total allows)."""
    raw = np.asarray(weights, dtype=float) / sum(weights) * total
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts))[: total - counts.sum()]:
        counts[i] += 1
    if at_least_one:
        counts = np.maximum(counts, 1)
    return counts.tolist()


def _take(rng: np.random.Generator, pool: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n random members of pool, the rest); fewer when the pool is smaller."""
    n = min(n, len(pool))
    picked = rng.permutation(len(pool))
    return pool[picked[:n]], pool[picked[n:]]


def _epoch(dt: datetime) -> int:
    return int((dt.astimezone(timezone.utc) - EPOCH).total_seconds())


# --- pools --------------------------------------------------------------------------------------

def _client_names(n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(firstName, lastName) for n clients and how many leading clients have a unique name."""
    last_pool = [p + s for p in LAST_PREFIXES for s in LAST_SUFFIXES]
    last_pool = list(dict.fromkeys(last_pool))
    # unique case-insensitively (casefold, NFC), so a name-only email never matches two clients
    seen, uniq = set(), []
    for name in last_pool:
        key = unicodedata.normalize("NFC", name).casefold()
        if key not in seen:
            seen.add(key)
            uniq.append(name)
    first = np.array(FIRST_NAMES, dtype=object)
    last = np.array(uniq, dtype=object)
    i = np.arange(n)
    unique_upto = len(first) * len(last)
    # last names cycle fastest: ~n / 2,400 clients share a last name (42 at 100,000 clients)
    return first[(i // len(last)) % len(first)], last[i % len(last)], unique_upto


def _creditor_pool() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sender_name, sender_email, domain) of ~1,500 distinct creditors."""
    names, emails, domains = [], [], []
    for kind in CREDITOR_KINDS:
        for city in CITIES:
            name = f"{kind} {city}"
            domain = f"{_slug(kind)}-{_slug(city)}.de"
            names.append(name)
            domains.append(domain)
            emails.append(f"forderungen@{domain}")
    return np.array(names, dtype=object), np.array(emails, dtype=object), np.array(domains, dtype=object)


# --- the generator ------------------------------------------------------------------------------

def generate(
    engine: sa.Engine,
    mongo_db: Any,
    *,
    emails: int = 1_000_000,
    clients: int = 100_000,
    creditors_per_client: int = 10,
    drift: float = 0.01,
    outbox: int = 5_000,
    keys: int = 5_000,
    window_end: datetime,
    seed: int = 0,
    noise: float = 0.02,
    name_only: float = 0.0002,
    poison_share: float = 0.05,
    undeliverable_share: float = 0.01,
    outbox_processed_old: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Empty and load the application's tables and the `clients` collection; return what was planted.

    `outbox` is the number of pending outbox messages (incl. `poison_share` poison and
    `undeliverable_share` for unknown clients; the rest are deliverable `incoming_email` messages
    whose email is the pair's newest, still `pending`). `outbox_processed_old` (default outbox // 2)
    processed rows older than the 30-day retention are added for the cleanup step. `keys`
    idempotency keys, half of them expired.
    """
    from reconciliation_pipeline.db import create_app_tables, upgrade

    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    rng = np.random.default_rng(seed)
    K = int(creditors_per_client)
    C = int(clients)
    if C < 1 or K < 1 or emails < 1:
        raise ValueError("emails, clients and creditors_per_client must be positive")
    n_pairs = C * K
    we = _epoch(window_end)
    ws = we - int(LOOKBACK.total_seconds())
    now = _epoch(datetime.now(timezone.utc))

    # -- clients and creditors
    first, last, unique_names = _client_names(C)
    cred_name, cred_email, cred_domain = _creditor_pool()
    n_cred = len(cred_name)
    if K > n_cred:
        raise ValueError(f"creditors_per_client must be <= {n_cred}")
    base = rng.integers(0, n_cred, C)
    step = rng.integers(1, max(2, n_cred // K + 1), C)  # slot * step < n_cred: distinct per client
    pair_client = np.repeat(np.arange(C), K)
    pair_slot = np.tile(np.arange(K), C)
    pair_cred = (base[pair_client] + pair_slot * step[pair_client]) % n_cred
    claim_cents = np.round(np.exp(rng.normal(np.log(200_000), 1.0, n_pairs))).astype(np.int64).clip(1_000, 10**9)
    az = _obj(AZ_BASE + np.arange(C))

    # -- emails: regular ones assigned to pairs, plus noise rows the window query must skip
    n_noise = int(round(emails * noise)) if emails >= 100 else 0
    n_reg = emails - n_noise
    pair = rng.integers(0, n_pairs, n_reg)
    received = ws + rng.integers(0, int(LOOKBACK.total_seconds()) - 600, n_reg)
    created = received + rng.integers(0, 600, n_reg)
    cents = np.round(np.exp(rng.normal(np.log(150_000), 1.1, n_reg))).astype(np.int64).clip(100, 10**9)
    level = rng.choice(np.array([1, 2, 3]), n_reg, p=[0.95, 0.03, 0.02])
    noise_pair = rng.integers(0, n_pairs, n_noise)
    noise_received = ws + rng.integers(0, int(LOOKBACK.total_seconds()) - 600, n_noise)
    noise_created = noise_received + rng.integers(0, 600, n_noise)

    # ids in created_at order (as a serial column would give), regular rows first on ties
    all_created = np.concatenate([created, noise_created])
    order = np.argsort(all_created, kind="stable")
    ids_all = np.empty(emails, dtype=np.int64)
    ids_all[order] = np.arange(1, emails + 1)
    ids = ids_all[:n_reg]
    noise_ids = ids_all[n_reg:]

    # newest (and second newest) email per pair: greatest received_at, then id
    by_pair = np.lexsort((ids, received, pair))
    sorted_pair = pair[by_pair]
    last_of_group = np.flatnonzero(np.r_[sorted_pair[1:] != sorted_pair[:-1], True])
    first_of_group = np.r_[0, last_of_group[:-1] + 1]
    emailed = sorted_pair[last_of_group]  # pairs with at least one email
    group_size = last_of_group - first_of_group + 1
    newest = np.full(n_pairs, -1, dtype=np.int64)  # index into the regular emails
    second = np.full(n_pairs, -1, dtype=np.int64)
    newest[emailed] = by_pair[last_of_group]
    has_two = group_size >= 2
    second[emailed[has_two]] = by_pair[last_of_group[has_two] - 1]
    count = np.zeros(n_pairs, dtype=np.int64)
    count[emailed] = group_size
    M = len(emailed)

    # -- what to plant, on disjoint sets of pairs
    n_plant = int(round(drift * M))
    if drift > 0:
        n_plant = max(n_plant, len(KINDS))
    want = dict(zip(KINDS, _split_counts(n_plant, KIND_WEIGHTS, drift > 0) if n_plant else [0] * len(KINDS)))
    singles = emailed[count[emailed] == 1]
    picked: dict[str, np.ndarray] = {}
    picked["client_not_found"], singles = _take(rng, singles, want["client_not_found"])
    picked["creditor_not_found"], singles = _take(rng, singles, want["creditor_not_found"])
    converted = np.concatenate([picked["client_not_found"], picked["creditor_not_found"]])
    rest = np.setdiff1d(emailed, converted)
    n_poison = int(round(outbox * poison_share)) if outbox else 0
    n_undeliverable = int(round(outbox * undeliverable_share)) if outbox else 0
    if outbox >= 20:
        n_poison, n_undeliverable = max(n_poison, 1), max(n_undeliverable, 1)
    n_deliverable = max(0, outbox - n_poison - n_undeliverable)
    outbox_pairs, rest = _take(rng, rest, n_deliverable)
    n_deliverable = len(outbox_pairs)
    for kind in ("data_mismatch", "missing_in_mongo", "invalid_mongo_amount", "invalid_pg_amount"):
        picked[kind], rest = _take(rng, rest, want[kind])
    unemailed = np.flatnonzero(count == 0)
    picked["extra_in_mongo"], unemailed = _take(rng, unemailed, want["extra_in_mongo"])
    old_answered, _ = _take(rng, unemailed, int(len(unemailed) * 0.3))

    # -- per email attributes
    client = pair // K
    email_cred = pair_cred[pair]
    from_email = cred_email[email_cred].copy()
    creditor_name = cred_name[email_cred].copy()
    lv2, lv3 = level == 2, level == 3
    from_email[lv2] = "noreply@" + cred_domain[email_cred[lv2]]
    from_email[lv3] = "service@" + cred_domain[email_cred[lv3]]
    creditor_name[lv3] = creditor_name[lv3] + " Forderungsmanagement"
    first_last = rng.random(n_reg) < 0.10
    client_name = np.where(first_last, first[client] + " " + last[client], last[client] + ", " + first[client])
    email_az = az[client].copy()
    with_az = np.ones(n_reg, dtype=bool)
    if C <= unique_names and name_only > 0:
        with_az &= ~(rng.random(n_reg) < name_only)
    amount_json = _amount_number_text(cents)
    as_string = np.flatnonzero(rng.random(n_reg) < 0.10)
    styles = rng.integers(0, 4, len(as_string))
    amount_json[as_string] = [json.dumps(_amount_string(c, s), ensure_ascii=False) for c, s in zip(cents[as_string].tolist(), styles.tolist())]
    sync_status = np.full(n_reg, "synced", dtype=object)
    sync_retry = np.zeros(n_reg, dtype=np.int64)
    sync_error = np.full(n_reg, "\\N", dtype=object)

    cnf = newest[picked["client_not_found"]]
    email_az[cnf] = _obj(BOGUS_AZ_BASE + np.arange(len(cnf)))
    with_az[cnf] = np.arange(len(cnf)) % 2 == 0  # half with an unknown aktenzeichen, half with a name only
    client_name[cnf] = "Unbekannt, Person"
    crnf = newest[picked["creditor_not_found"]]
    k = _obj(np.arange(len(crnf)))
    from_email[crnf] = "post@fremdfirma-" + k + ".example"
    creditor_name[crnf] = "Fremdfirma " + k
    ipg = newest[picked["invalid_pg_amount"]]
    amount_json[ipg] = np.array(INVALID_PG_JSON, dtype=object)[np.arange(len(ipg)) % len(INVALID_PG_JSON)]
    ob = newest[outbox_pairs]
    sync_status[ob] = "pending"
    ob_retry = rng.integers(0, 4, len(ob))
    sync_retry[ob] = ob_retry
    sync_error[ob] = "MongoDB write failed: ServerSelectionTimeoutError"

    # -- MongoDB state per pair: 0 unanswered, 1 answered (m_cents, m_time), 2 amount null, 3 invalid value
    state = np.zeros(n_pairs, dtype=np.int8)
    m_cents = np.zeros(n_pairs, dtype=np.int64)
    m_time = np.zeros(n_pairs, dtype=np.int64)
    state[emailed] = 1
    m_cents[emailed] = cents[newest[emailed]]
    m_time[emailed] = received[newest[emailed]]
    state[converted] = 0
    ob_two = outbox_pairs[second[outbox_pairs] >= 0]
    ob_one = outbox_pairs[second[outbox_pairs] < 0]
    m_cents[ob_two] = cents[second[ob_two]]
    m_time[ob_two] = received[second[ob_two]]
    state[ob_one] = 0
    dm = picked["data_mismatch"]
    delta = rng.integers(1, 50_000, len(dm)) * np.where(rng.random(len(dm)) < 0.5, -1, 1)
    new = m_cents[dm] + delta
    m_cents[dm] = np.where(new >= 0, new, m_cents[dm] + np.abs(delta))
    mim = picked["missing_in_mongo"]
    state[mim[0::2]] = 0  # never written
    state[mim[1::2]] = 2  # written with a null amount
    imv = picked["invalid_mongo_amount"]
    state[imv] = 3
    invalid_value = np.zeros(n_pairs, dtype=np.int64)
    invalid_value[imv] = np.arange(len(imv)) % len(INVALID_MONGO_VALUES)
    extra = picked["extra_in_mongo"]
    state[extra] = 1
    m_cents[extra] = claim_cents[extra] // 2
    m_time[extra] = ws + rng.integers(0, int(LOOKBACK.total_seconds()), len(extra))
    state[old_answered] = 1
    m_cents[old_answered] = claim_cents[old_answered] // 3
    m_time[old_answered] = ws - rng.integers(86_400, 60 * 86_400, len(old_answered))
    timings["plan"] = time.perf_counter() - t0

    # -- PostgreSQL
    t = time.perf_counter()
    url = engine.url.render_as_string(hide_password=False)
    create_app_tables(url)
    upgrade(url)
    with engine.begin() as conn:
        conn.execute(sa.text(
            "TRUNCATE incoming_emails, outbox_messages, idempotency_keys, reconciliation_findings, "
            "reconciliation_reports RESTART IDENTITY CASCADE"
        ))
    timings["pg_reset"] = time.perf_counter() - t
    say(f"datagen: planned {emails:,} emails, {C:,} clients x {K} creditors, {M:,} pairs with email; loading PostgreSQL")

    t = time.perf_counter()
    ref = "AZ-" + _obj(ids)
    az_part = np.where(with_az, '"client_aktenzeichen": "' + email_az + '", ', "")
    extracted = (
        '{"is_creditor_reply": true, "client_name": "' + client_name + '", ' + az_part + '"creditor_name": "'
        + creditor_name + '", "debt_amount": ' + amount_json + ', "reference_numbers": ["' + ref + '"], "confidence": 0.9}'
    )
    reg_cols = {
        "id": _obj(ids), "from_email": from_email, "from_name": creditor_name,
        "subject": "Ihr Schreiben vom " + _obj(np.datetime_as_string(received.astype("datetime64[s]"), unit="D")),
        "extracted_data": extracted, "received_at": _ts_text(received), "created_at": _ts_text(created),
        "sync_status": sync_status, "sync_error": sync_error, "sync_retry_count": _obj(sync_retry),
    }
    # noise: pending with data (no outbox), not_applicable, synced with NULL data, synced without debt_amount
    noise_kind = np.arange(n_noise) % 5
    nc = noise_pair // K
    ncred = pair_cred[noise_pair]
    noise_extracted = np.where(
        noise_kind == 0,
        '{"is_creditor_reply": true, "client_name": "' + last[nc] + ", " + first[nc] + '", "client_aktenzeichen": "'
        + az[nc] + '", "creditor_name": "' + cred_name[ncred] + '", "debt_amount": 99.99}',
        np.where(noise_kind == 1, '{"is_creditor_reply": false, "confidence": 0.2}',
                 np.where(noise_kind == 2, "\\N", '{"is_creditor_reply": true, "client_aktenzeichen": "' + az[nc] + '", "debt_amount_missing": true}')),
    ).astype(object)
    noise_kind_status = np.array(["pending", "not_applicable", "synced", "synced", "failed"], dtype=object)
    noise_cols = {
        "id": _obj(noise_ids), "from_email": cred_email[ncred], "from_name": cred_name[ncred],
        "subject": np.full(n_noise, "Automatische Antwort", dtype=object), "extracted_data": noise_extracted,
        "received_at": _ts_text(noise_received), "created_at": _ts_text(noise_created),
        "sync_status": noise_kind_status[noise_kind], "sync_error": np.full(n_noise, "\\N", dtype=object),
        "sync_retry_count": np.full(n_noise, "0", dtype=object),
    }
    raw = engine.raw_connection()
    try:
        dbapi = raw.driver_connection
        with dbapi.cursor() as cur:
            columns = (
                "id, zendesk_ticket_id, from_email, from_name, subject, extracted_data, processing_status, match_status, "
                "received_at, created_at, updated_at, sync_status, sync_error, sync_retry_count, idempotency_key"
            )
            with cur.copy(f"COPY incoming_emails ({columns}) FROM STDIN") as copy:
                for cols in (reg_cols, noise_cols):
                    n = len(cols["id"])
                    for lo in range(0, n, PG_CHUNK):
                        c = {name: v[lo : lo + PG_CHUNK] for name, v in cols.items()}
                        lines = (
                            c["id"] + "\tZD-" + c["id"] + "\t" + c["from_email"] + "\t" + c["from_name"] + "\t"
                            + c["subject"] + "\t" + c["extracted_data"] + "\tcompleted\tmatched\t" + c["received_at"]
                            + "\t" + c["created_at"] + "\t" + c["created_at"] + "\t" + c["sync_status"] + "\t"
                            + c["sync_error"] + "\t" + c["sync_retry_count"] + "\t\\N"
                        )
                        copy.write(("\n".join(lines.tolist()) + "\n").encode())
                    say(f"datagen: incoming_emails {n:,} rows copied")
            cur.execute("SELECT setval(pg_get_serial_sequence('incoming_emails', 'id'), %s)", (emails,))
        dbapi.commit()
        timings["pg_emails"] = time.perf_counter() - t

        # outbox: deliverable (incoming_email, pending email), poison, undeliverable, old processed
        t = time.perf_counter()
        rows: list[tuple] = []
        ob_list = ob.tolist()
        for j, e in enumerate(ob_list):
            payload = {
                "client_name": str(client_name[e]), "creditor_email": str(from_email[e]),
                "creditor_name": str(creditor_name[e]), "new_debt_amount": int(cents[e]) / 100,
                "response_text": "Wir bestätigen die offene Forderung.", "reference_numbers": [f"AZ-{int(ids[e])}"],
            }
            if with_az[e]:
                payload["client_aktenzeichen"] = str(email_az[e])
            rows.append(("incoming_email", str(int(ids[e])), payload, int(created[e]) + 5, None, int(ob_retry[j])))
        poison_payloads = (
            lambda i: {"client_aktenzeichen": str(az[i % C]), "creditor_email": "x@example.org", "response_text": "ohne Betrag"},
            lambda i: {"client_aktenzeichen": str(az[i % C]), "creditor_email": "x@example.org", "new_debt_amount": "abc"},
            lambda i: {"creditor_email": "x@example.org", "new_debt_amount": 10.5},
            lambda i: {"client_aktenzeichen": str(az[i % C]), "creditor_email": "x@example.org", "debt_amount": -3},
        )
        for i in range(n_poison):
            rows.append(("creditor_debt_update", f"poison-{i}", poison_payloads[i % 4](i), we - 3600 + i % 3000, None, 0))
        for i in range(n_undeliverable):
            payload = {"client_aktenzeichen": str(BOGUS_AZ_BASE + 5_000_000 + i), "client_name": "Niemand, Nirgends",
                       "creditor_email": "forderungen@unbekannt.example", "new_debt_amount": 42.0}
            rows.append(("creditor_debt_update", f"unknown-{i}", payload, we - 1800 + i % 1000, None, 0))
        n_old = outbox // 2 if outbox_processed_old is None else int(outbox_processed_old)
        for i in range(n_old):
            created_old = now - 40 * 86_400 - i % 86_400
            rows.append(("incoming_email", str(1 + i % emails), {"new_debt_amount": 1.0}, created_old, created_old + 60, 0))
        with dbapi.cursor() as cur:
            with cur.copy(
                "COPY outbox_messages (id, aggregate_type, aggregate_id, operation, payload, idempotency_key, created_at, "
                "processed_at, retry_count, max_retries, error_message) FROM STDIN"
            ) as copy:
                for i, (atype, agg, payload, c_at, p_at, retry) in enumerate(rows, start=1):
                    copy.write_row((
                        i, atype, agg, "UPDATE", json.dumps(payload, ensure_ascii=False), f"outbox-{seed}-{i}",
                        datetime.fromtimestamp(c_at, timezone.utc),
                        None if p_at is None else datetime.fromtimestamp(p_at, timezone.utc), retry, 5,
                        None if p_at is not None or retry == 0 else "MongoDB write failed: ServerSelectionTimeoutError",
                    ))
            cur.execute("SELECT setval(pg_get_serial_sequence('outbox_messages', 'id'), %s)", (max(1, len(rows)),))
            n_expired = keys // 2
            offsets = np.where(
                np.arange(keys) < n_expired, -rng.integers(60, 30 * 86_400, keys), rng.integers(3_600, 7 * 86_400, keys)
            )
            expires = now + offsets
            key_lines = ("idem-" + _obj(np.arange(keys)) + "\t" + _ts_text(expires - 86_400) + "\t" + _ts_text(expires) + "\t\\N")
            with cur.copy("COPY idempotency_keys (key, created_at, expires_at, response) FROM STDIN") as copy:
                if keys:
                    copy.write(("\n".join(key_lines.tolist()) + "\n").encode())
        dbapi.commit()
        timings["pg_outbox_keys"] = time.perf_counter() - t
        t = time.perf_counter()
        dbapi.autocommit = True
        with dbapi.cursor() as cur:
            cur.execute("VACUUM ANALYZE incoming_emails")
            cur.execute("ANALYZE outbox_messages")
            cur.execute("ANALYZE idempotency_keys")
        timings["pg_analyze"] = time.perf_counter() - t
    finally:
        try:
            raw.driver_connection.autocommit = False
        finally:
            raw.close()
    say(f"datagen: PostgreSQL loaded in {sum(v for k, v in timings.items() if k.startswith('pg_')):.1f}s; loading MongoDB")

    # -- MongoDB
    t = time.perf_counter()
    coll = mongo_db["clients"]
    coll.drop()
    claim_f = (claim_cents / 100).tolist()
    m_amount = (m_cents / 100).tolist()
    m_dt = m_time.astype("datetime64[s]").astype("datetime64[us]").astype(object)  # naive UTC datetimes
    contacted = datetime.fromtimestamp(ws - 90 * 86_400, timezone.utc).replace(tzinfo=None)
    state_l = state.tolist()
    names_l, emails_l = cred_name.tolist(), cred_email.tolist()
    pair_cred_l = pair_cred.tolist()
    inv_l = invalid_value.tolist()
    first_l, last_l, az_l = first.tolist(), last.tolist(), az.tolist()
    inserted = 0
    for lo in range(0, C, MONGO_BATCH):
        docs = []
        for c in range(lo, min(C, lo + MONGO_BATCH)):
            creditors = []
            for p in range(c * K, c * K + K):
                cid = pair_cred_l[p]
                s = state_l[p]
                el = {"sender_name": names_l[cid], "sender_email": emails_l[cid], "claim_amount": claim_f[p]}
                if s == 1:
                    el.update(
                        current_debt_amount=m_amount[p], creditor_response_amount=m_amount[p],
                        amount_source="creditor_response", response_received_at=m_dt[p], contact_status="responded",
                        last_contacted_at=m_dt[p],
                    )
                elif s == 2:
                    el.update(
                        current_debt_amount=claim_f[p], creditor_response_amount=None, amount_source="creditor_response",
                        response_received_at=m_dt[p], contact_status="responded", last_contacted_at=m_dt[p],
                    )
                elif s == 3:
                    el.update(
                        current_debt_amount=claim_f[p], creditor_response_amount=INVALID_MONGO_VALUES[inv_l[p]],
                        amount_source="creditor_response", response_received_at=m_dt[p], contact_status="responded",
                        last_contacted_at=m_dt[p],
                    )
                else:
                    el.update(current_debt_amount=claim_f[p], contact_status="contacted", last_contacted_at=contacted)
                creditors.append(el)
            docs.append({"aktenzeichen": az_l[c], "firstName": first_l[c], "lastName": last_l[c], "final_creditor_list": creditors})
        coll.insert_many(docs, ordered=False)
        inserted += len(docs)
        if (lo // MONGO_BATCH) % 10 == 9 or inserted == C:
            el = time.perf_counter() - t
            say(f"datagen: MongoDB {inserted:,}/{C:,} documents ({inserted / el:,.0f} docs/s)")
    timings["mongo_insert"] = time.perf_counter() - t
    t = time.perf_counter()
    coll.create_index("aktenzeichen")
    coll.create_index("lastName")
    timings["mongo_index"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    planted = {kind: int(len(picked[kind])) for kind in KINDS}
    emails_in_window_query = int(n_reg)  # every regular email is synced, has a debt_amount and lies in the window
    return {
        "seed": seed,
        "window_start": datetime.fromtimestamp(ws, timezone.utc),
        "window_end": datetime.fromtimestamp(we, timezone.utc),
        "emails": int(emails),
        "emails_regular": int(n_reg),
        "emails_noise": int(n_noise),
        "emails_synced_with_amount": emails_in_window_query - int(n_deliverable),
        "emails_pending_outbox": int(n_deliverable),
        "emails_name_only": int((~with_az).sum()),
        "clients": C,
        "creditors_per_client": K,
        "creditor_elements": int(n_pairs),
        "pairs_with_email": int(M),
        "pairs_with_several_emails": int((count >= 2).sum()),
        "match_levels": {str(lv): int((level == lv).sum()) for lv in (1, 2, 3)},
        "planted": planted,
        "planted_total": int(sum(planted.values())),
        "expected_repairs": int(sum(planted[k] for k in REPAIRABLE)),
        # after the outbox retry delivered every deliverable message: every emailed pair is checked
        "expected_records_checked": int(M),
        "outbox_pending": int(n_deliverable + n_poison + n_undeliverable),
        "outbox_deliverable": int(n_deliverable),
        "outbox_poison": int(n_poison),
        "outbox_undeliverable": int(n_undeliverable),
        "outbox_processed_old": int(n_old),
        "keys": int(keys),
        "keys_expired": int(keys // 2),
        "mongo_answered_outside_window": int(len(old_answered)),
        "seconds": {k: round(v, 3) for k, v in timings.items()},
    }
