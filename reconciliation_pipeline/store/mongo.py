"""MongoDB access: batched, projected reads and the compare-and-swap writer shared by repair and outbox."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from bson import ObjectId
from pymongo import UpdateOne
from pymongo.collection import Collection
from pymongo.errors import ConnectionFailure, PyMongoError

from reconciliation_pipeline.core.keys import route_key
from reconciliation_pipeline.core.repair import (
    REPAIR_FAILED,
    REPAIRED,
    SKIPPED_CONCURRENT_CHANGE,
    SUPERSEDED,
    ElementUpdate,
    Outcome,
    plan_client,
    verify,
)

COMPARED_FIELDS = {"aktenzeichen": 1, "firstName": 1, "lastName": 1, "final_creditor_list": 1}


def prefetched(batches: Iterator[Any], depth: int = 1) -> Iterator[Any]:
    """The items of `batches`, read ahead by a thread while the caller works on the previous one:
    the server's work and the wire transfer overlap the comparison (at most `depth` items ahead).
    An error of the reader is raised in the caller at the item it would have produced."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def read() -> None:
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        items.put((item, None), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put((done, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            items.put((done, exc))

    reader = threading.Thread(target=read, name="mongo-prefetch", daemon=True)
    reader.start()
    try:
        while True:
            item, error = items.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        reader.join(timeout=5)


def _chunks(values: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(values), size):
        yield values[i : i + size]


def _plain_strings(values: Iterable[Any]) -> list[str]:
    # Only plain strings ever reach a filter: a dict such as {"$ne": None} would be an operator.
    return sorted({v for v in values if isinstance(v, str) and v and "\x00" not in v})


def iter_client_batches(
    collection: Collection,
    aktenzeichen: Iterable[Any],
    last_name_patterns: Iterable[str],
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[list[dict]]:
    """Client documents by aktenzeichen (`$in`) or by last name (anchored, escaped, case-insensitive
    `$regex` from keys.last_name_patterns), one query per batch of keys, projected to the compared
    fields. A document may come in more than one batch (by aktenzeichen and by name)."""
    queries: list[dict] = [{"aktenzeichen": {"$in": list(chunk)}} for chunk in _chunks(_plain_strings(aktenzeichen), batch_size)]
    queries += [{"lastName": {"$regex": regex, "$options": "i"}} for regex in combined_patterns(_plain_strings(last_name_patterns))]
    for done, query in enumerate(queries, start=1):
        yield list(collection.find(query, COMPARED_FIELDS, batch_size=1000))
        if progress:
            progress(done, len(queries))


_ANCHORS = ("^\\s*", "\\s*$")
_MAX_REGEX_CHARS = 16_000  # well below the server's limit on a pattern's size


def combined_patterns(patterns: Sequence[str]) -> list[str]:
    """keys.last_name_patterns joined into few alternations (`^\\s*(?:a|b|...)\\s*$`): one regex per
    document and query instead of one per pattern, ten times faster on the wire stand-in."""
    head, tail = _ANCHORS
    anchored = [p for p in patterns if p.startswith(head) and p.endswith(tail) and len(p) > len(head) + len(tail)]
    bodies = [p[len(head) : len(p) - len(tail)] for p in anchored]
    kept = set(anchored)
    out: list[str] = [p for p in patterns if p not in kept]  # any other pattern stays as it is
    current: list[str] = []
    size = 0
    for body in bodies:
        if current and size + len(body) > _MAX_REGEX_CHARS:
            out.append(head + "(?:" + "|".join(current) + ")" + tail)
            current, size = [], 0
        current.append(body)
        size += len(body) + 1
    if current:
        out.append(head + "(?:" + "|".join(current) + ")" + tail)
    return out


def fetch_clients(collection: Collection, aktenzeichen: Iterable[Any], last_name_patterns: Iterable[str], batch_size: int) -> list[dict]:
    """All client documents for the keys (small sets: outbox batches), without duplicates."""
    docs: dict[Any, dict] = {}
    for batch in iter_client_batches(collection, aktenzeichen, last_name_patterns, batch_size):
        docs.update((d["_id"], d) for d in batch)
    return list(docs.values())


def iter_clients_by_aktenzeichen(collection: Collection, aktenzeichen: Sequence[str], batch_size: int) -> Iterator[tuple[list[str], list[dict]]]:
    """(keys, their client documents) per `$in` query of `batch_size` aktenzeichen, projected."""
    for chunk in _chunks(_plain_strings(aktenzeichen), batch_size):
        yield list(chunk), list(collection.find({"aktenzeichen": {"$in": list(chunk)}}, COMPARED_FIELDS, batch_size=1000))


def iter_all_clients(collection: Collection, batch_size: int) -> Iterator[tuple[list[str], list[dict]]]:
    """(route keys, client documents) for the whole collection in one pass sorted by aktenzeichen,
    cut into batches of about `batch_size` documents that never split an aktenzeichen."""
    batch: list[dict] = []
    last: Any = object()
    cursor = collection.find({}, COMPARED_FIELDS, batch_size=1000, allow_disk_use=True).sort("aktenzeichen", 1)
    for doc in cursor:
        az = doc.get("aktenzeichen")
        if len(batch) >= batch_size and az != last:
            yield [document_route(d) for d in batch], batch
            batch = []
        batch.append(doc)
        last = az
    if batch:
        yield [document_route(d) for d in batch], batch


def document_route(doc: Mapping) -> str:
    """keys.route_key of a client document."""
    return route_key(doc.get("aktenzeichen"), str(doc["_id"]))


def iter_answered_since(collection: Collection, start: datetime) -> Iterator[dict]:
    """_id and aktenzeichen of the client documents with a creditor answer recorded since `start`.

    A superset on purpose: the window's end is applied in pandas. nx-27017 answers a `$gte`/`$lt`
    pair on a date inside `$elemMatch` with no documents at all, while this form is exact on real
    MongoDB and a superset on the stand-in.
    """
    query = {"final_creditor_list": {"$elemMatch": {"amount_source": "creditor_response", "response_received_at": {"$gte": start}}}}
    return iter(collection.find(query, {"aktenzeichen": 1}, batch_size=10_000))


def iter_by_ids(collection: Collection, ids: Sequence[Any], batch_size: int, projection: Mapping = COMPARED_FIELDS) -> Iterator[list[dict]]:
    """Client documents by _id (ObjectIds or their hex strings), projected, `batch_size` per query."""
    for chunk in _chunks(list(ids), batch_size):
        object_ids = [ObjectId(i) if isinstance(i, str) and ObjectId.is_valid(i) else i for i in chunk]
        yield list(collection.find({"_id": {"$in": object_ids}}, projection, batch_size=1000))


def fetch_by_ids(collection: Collection, ids: Sequence[Any], batch_size: int) -> dict[str, dict]:
    """Whole client documents by _id (string keys), in batches."""
    return {str(d["_id"]): d for docs in iter_by_ids(collection, ids, batch_size, {"final_creditor_list": 1, "aktenzeichen": 1}) for d in docs}


def _cas_filter(doc_id: Any, observed: list) -> dict:
    # $literal: the observed list may hold strings starting with '$', which must not be read as paths.
    return {"_id": doc_id, "$expr": {"$eq": ["$final_creditor_list", {"$literal": observed}]}}


def write_updates(
    collection: Collection,
    documents: Mapping[str, Mapping],
    updates: Mapping[str, Sequence[ElementUpdate]],
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> dict[Hashable, Outcome]:
    """Apply updates per client with one compare-and-swap write each (bulk_write), then read back.

    Only a change seen in the read-back counts as repaired. A document that changed since it was
    read is left alone: the concurrent write wins and the update is skipped_concurrent_change.
    """
    outcomes: dict[Hashable, Outcome] = {}
    client_ids = [cid for cid in updates if updates[cid]]
    total = (len(client_ids) + batch_size - 1) // batch_size
    for done, chunk in enumerate(_chunks(client_ids, batch_size), start=1):
        plans = {}
        for cid in chunk:
            doc = documents.get(cid)
            if doc is None or not isinstance(doc.get("final_creditor_list"), list):
                for u in updates[cid]:
                    outcomes[u.key] = Outcome(SKIPPED_CONCURRENT_CHANGE, error="client document or its creditor list is gone")
                continue
            plan = plan_client(doc["final_creditor_list"], updates[cid])
            for u in updates[cid]:
                if u.key in plan.conflicts:
                    outcomes[u.key] = Outcome(SKIPPED_CONCURRENT_CHANGE, error=plan.conflicts[u.key])
                elif u.key in plan.newer:
                    outcomes[u.key] = Outcome(SUPERSEDED, error=plan.newer[u.key])
            if plan.applied:
                plans[cid] = (doc["_id"], plan)
        if not plans:
            continue
        try:
            collection.bulk_write(
                [UpdateOne(_cas_filter(oid, p.observed), {"$set": {"final_creditor_list": p.new}}) for oid, p in plans.values()],
                ordered=False,
            )
        except ConnectionFailure as exc:
            _unknown(plans, outcomes, f"MongoDB connection lost during write: {type(exc).__name__}")
            _abandon(client_ids[client_ids.index(chunk[-1]) + 1 :], updates, outcomes)
            break
        except PyMongoError as exc:
            for _, plan in plans.values():
                for u in plan.applied:
                    outcomes[u.key] = Outcome(REPAIR_FAILED, plan.before.get(u.key), error=f"write failed: {type(exc).__name__}: {exc}"[:500])
            continue
        try:
            read_back = fetch_by_ids(collection, [oid for oid, _ in plans.values()], batch_size)
        except ConnectionFailure as exc:
            _unknown(plans, outcomes, f"MongoDB connection lost before read-back: {type(exc).__name__}")
            _abandon(client_ids[client_ids.index(chunk[-1]) + 1 :], updates, outcomes)
            break
        for cid, (oid, plan) in plans.items():
            current = (read_back.get(str(oid)) or {}).get("final_creditor_list")
            for u in plan.applied:
                ok, after = verify(current, u)
                if ok:
                    outcomes[u.key] = Outcome(REPAIRED, plan.before.get(u.key), after)
                elif current == plan.observed:
                    outcomes[u.key] = Outcome(REPAIR_FAILED, plan.before.get(u.key), after, "write acknowledged but not visible in the read-back")
                else:
                    outcomes[u.key] = Outcome(SKIPPED_CONCURRENT_CHANGE, plan.before.get(u.key), after, "read-back differs: a concurrent write won")
        if progress:
            progress(done, total)
    return outcomes


def _unknown(plans: Mapping, outcomes: dict, message: str) -> None:
    for _, plan in plans.values():
        for u in plan.applied:
            outcomes[u.key] = Outcome(REPAIR_FAILED, plan.before.get(u.key), error=message + " (unverified)", connection_lost=True)


def _abandon(client_ids: Sequence[str], updates: Mapping[str, Sequence[ElementUpdate]], outcomes: dict) -> None:
    for cid in client_ids:
        for u in updates[cid]:
            outcomes.setdefault(u.key, Outcome(REPAIR_FAILED, error="not attempted: MongoDB connection lost", connection_lost=True))
