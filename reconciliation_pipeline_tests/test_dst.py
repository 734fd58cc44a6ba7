"""Daylight saving time in Europe/Berlin: hourly partitions and their windows tile time exactly.

2026-03-29 springs forward (02:00 CET -> 03:00 CEST: a 23-hour day), 2026-10-25 falls back
(03:00 CEST -> 02:00 CET: a 25-hour day whose 02:00 hour exists twice; Dagster names the second one
`2026-10-25-02:00+0100`).
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from reconciliation_pipeline.run.extract import extract_postgres
from reconciliation_pipeline.run.types import RunContext, window_for
from reconciliation_pipeline.partitions import hourly_partitions
from reconciliation_pipeline_tests.builders import add_client, add_email, creditor, findings, reply, reports
from reconciliation_pipeline_tests.support import NullLog, element

BERLIN = ZoneInfo("Europe/Berlin")
UTC = timezone.utc
HOUR = timedelta(hours=1)
DAYS = {date(2026, 3, 29): 23, date(2026, 10, 25): 25}
ALL_KEYS = hourly_partitions.get_partition_keys(current_time=datetime(2027, 1, 1, tzinfo=UTC))


def berlin_day_bounds(day: date) -> tuple[datetime, datetime]:
    """[local midnight, next local midnight) of a Berlin day, in UTC."""
    start = datetime.combine(day, time(0), tzinfo=BERLIN).astimezone(UTC)
    end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=BERLIN).astimezone(UTC)
    return start, end


def partition_window(key: str) -> tuple[datetime, datetime]:
    window = hourly_partitions.time_window_for_partition_key(key)
    return window.start.astimezone(UTC), window.end.astimezone(UTC)


def keys_of_day(day: date) -> list[str]:
    """The partitions whose hour starts on this Berlin day, in time order."""
    start, end = berlin_day_bounds(day)
    candidates = [k for k in ALL_KEYS if k[:10] in {(day - timedelta(days=1)).isoformat(), day.isoformat(), (day + timedelta(days=1)).isoformat()}]
    keys = [k for k in candidates if start <= partition_window(k)[0] < end]
    return sorted(keys, key=lambda k: partition_window(k)[0])


def run_windows(keys: list[str], lookback: int = 1) -> list[tuple[datetime, datetime]]:
    return [window_for(hourly_partitions.time_window_for_partition_key(k).end, lookback) for k in keys]


@pytest.mark.parametrize("day", list(DAYS))
def test_partition_count_per_day(day):
    keys = keys_of_day(day)
    assert len(keys) == DAYS[day], keys
    assert len(set(keys)) == len(keys)
    if day.month == 10:
        assert "2026-10-25-02:00" in keys and "2026-10-25-02:00+0100" in keys
    else:
        assert not any(k.startswith("2026-03-29-02:") for k in keys), keys


@pytest.mark.parametrize("day", list(DAYS))
def test_one_hour_windows_tile_the_day_without_gap_or_overlap(day):
    keys = keys_of_day(day - timedelta(days=1))[-1:] + keys_of_day(day) + keys_of_day(day + timedelta(days=1))[:1]
    windows = run_windows(keys)
    for key, (start, end) in zip(keys, windows):
        assert start.tzinfo is not None and end.utcoffset() == timedelta(0), key
        assert end - start == HOUR, (key, start, end)
        assert (start, end) == partition_window(key), f"{key}: the run's window is not the partition's own hour"
    for (key_a, (_, end_a)), (key_b, (start_b, _)) in zip(zip(keys, windows), zip(keys[1:], windows[1:])):
        assert end_a == start_b, f"gap or overlap between {key_a} and {key_b}: {end_a} vs {start_b}"
    day_start, day_end = berlin_day_bounds(day)
    inner = windows[1:-1]
    assert inner[0][0] == day_start and inner[-1][1] == day_end
    assert day_end - day_start == DAYS[day] * HOUR


@pytest.mark.parametrize("day", list(DAYS))
def test_every_utc_minute_of_the_day_falls_in_exactly_one_window(day):
    windows = run_windows(keys_of_day(day))
    day_start, day_end = berlin_day_bounds(day)
    minute, seen = day_start, 0
    while minute < day_end:
        containing = [w for w in windows if w[0] <= minute < w[1]]
        assert len(containing) == 1, (minute, containing)
        # the boundary instant itself and the last microsecond before it
        just_before = minute - timedelta(microseconds=1)
        if just_before >= day_start:
            assert len([w for w in windows if w[0] <= just_before < w[1]]) == 1, just_before
        minute += timedelta(minutes=1)
        seen += 1
    assert seen == DAYS[day] * 60


@pytest.mark.parametrize("key", ["2026-03-29-03:00", "2026-03-30-01:00", "2026-10-25-02:00+0100", "2026-10-26-01:00"])
def test_long_lookback_is_exact_elapsed_time_across_the_change(key):
    start, end = run_windows([key], lookback=48)[0]
    assert end - start == timedelta(hours=48)
    assert end == partition_window(key)[1]


def test_windows_select_each_minute_once_through_the_postgres_extract(pg):
    """Emails at every UTC minute of the fall-back day, extracted per partition with lookback 1 through the
    pipeline's own window query: each email is in exactly one partition's window."""
    day = date(2026, 10, 25)
    day_start, day_end = berlin_day_bounds(day)
    import sqlalchemy as sa

    with pg.begin() as conn:
        ids = conn.execute(sa.text(
            "INSERT INTO incoming_emails (zendesk_ticket_id, from_email, received_at, created_at, sync_status, "
            "processing_status, extracted_data) SELECT 'ZD-' || g, 'dst@x.de', t, t, 'synced', 'completed', "
            "json_build_object('client_aktenzeichen', '542900', 'debt_amount', 1) "
            "FROM generate_series(:start, :end - interval '1 minute', interval '1 minute') WITH ORDINALITY AS s(t, g) "
            "RETURNING id"
        ), {"start": day_start, "end": day_end}).scalars().all()
    assert len(ids) == 25 * 60
    seen: dict[int, list[str]] = {}
    for key in keys_of_day(day):
        start, end = run_windows([key])[0]
        ctx = RunContext(0, "dst", key, start, end, False)
        emails = extract_postgres(pg, ctx, log=NullLog())
        for email_id in emails.loc[emails["in_window"], "email_id"]:
            seen.setdefault(int(email_id), []).append(key)
    assert set(seen) == set(ids)
    assert {k: v for k, v in seen.items() if len(v) != 1} == {}


SENDER_A, SENDER_B = "a@inkasso.de", "b@inkasso.de"


def test_end_to_end_run_of_the_repeated_hour(pg, mongo_db, reconcile):
    """Partition 2026-10-25-02:00+0100 (the second 02:00, 01:00-02:00 UTC) reconciles the email created in
    that UTC hour and not the one of the first 02:00 (00:00-01:00 UTC); then the first 02:00 gets its own."""
    earlier = datetime(2026, 10, 1, tzinfo=UTC)  # MongoDB's answers predate the emails
    add_client(mongo_db, "542900", [creditor(SENDER_A, 1.0, name="Alpha Inkasso", response_received_at=earlier),
                                    creditor(SENDER_B, 2.0, name="Beta Inkasso", response_received_at=earlier)])
    second_hour = datetime(2026, 10, 25, 1, 30, tzinfo=UTC)   # 02:30 CET (second 02:00 hour)
    first_hour = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)    # 02:30 CEST (first 02:00 hour)
    in_second = add_email(pg, from_email=SENDER_A, extracted=reply(amount=111, creditor_name="Alpha Inkasso"), received_at=second_hour)
    in_first = add_email(pg, from_email=SENDER_B, extracted=reply(amount=222, creditor_name="Beta Inkasso"), received_at=first_hour)

    result = reconcile(partition="2026-10-25-02:00+0100", lookback_hours=1)
    assert result.success
    [report] = reports(pg)
    assert report["partition_key"] == "2026-10-25-02:00+0100"
    assert (report["window_start"], report["window_end"]) == (datetime(2026, 10, 25, 1, tzinfo=UTC), datetime(2026, 10, 25, 2, tzinfo=UTC))
    assert [(f["email_id"], f["action"]) for f in findings(pg)] == [(in_second, "repaired")]
    assert element(mongo_db, "542900", 0)["creditor_response_amount"] == 111.0
    assert element(mongo_db, "542900", 1)["creditor_response_amount"] == 2.0  # the other 02:00 hour is not touched

    result = reconcile(partition="2026-10-25-02:00", lookback_hours=1)
    assert result.success
    second = reports(pg)[1]
    assert (second["window_start"], second["window_end"]) == (datetime(2026, 10, 25, 0, tzinfo=UTC), datetime(2026, 10, 25, 1, tzinfo=UTC))
    assert [(f["email_id"], f["action"]) for f in findings(pg) if f["report_id"] == second["id"]] == [(in_first, "repaired")]
    assert element(mongo_db, "542900", 1)["creditor_response_amount"] == 222.0
    assert element(mongo_db, "542900", 0)["creditor_response_amount"] == 111.0
