"""The series behind the console's charts, at fixed times: requests counted per step by the
database (both dialects), slot use, emails verified and the completion-to-results delay from
the ledger; the last point of slot use is the overview's figure."""
import datetime

from bouncer.reading.history import chart_series
from bouncer.reading.overview import queue_overview
from bouncer.store.models import BouncerBatch, RateLimitTracker

NOW = datetime.datetime(2026, 12, 1, 12, 0, 0, 250000)
MINUTE = datetime.timedelta(minutes=1)


def requests_at(moment, n):
    RateLimitTracker.insert_many([{"requested_at": moment, "kind": "status"}] * n).execute()


def test_requests_per_minute_are_counted_per_step(db, settings):
    requests_at(NOW - 90 * datetime.timedelta(seconds=1), 30)
    requests_at(NOW - 10 * datetime.timedelta(seconds=1), 6)
    requests_at(NOW, 2)                                 # this very moment: the last step's
    requests_at(NOW - 2 * 60 * MINUTE, 5)               # before the window
    hour = chart_series(settings, hours=1, now=NOW)
    assert hour["step_seconds"] == 60 and len(hour["times"]) == len(hour["requests_per_minute"]) == 60
    assert hour["times"][-1] == "2026-12-01T12:00:00.250000Z"
    assert hour["requests_per_minute"][-2:] == [30, 8] and sum(hour["requests_per_minute"]) == 38
    six = chart_series(settings, hours=6, now=NOW)
    assert len(six["times"]) == 72 and six["requests_per_minute"][-1] == 38 * 60 / 300
    day = chart_series(settings, hours=24, now=NOW)
    assert len(day["times"]) == 96
    assert [(i, n) for i, n in enumerate(day["requests_per_minute"]) if n] == [(88, 0.33), (95, 2.53)]


def test_slot_use_verified_and_delay_from_the_ledger(db, settings):
    BouncerBatch.create(check_type="deliverable", status="completed", quantity=10, reserved_at=NOW - 50 * MINUTE,
                        sent_at=NOW - 50 * MINUTE, bouncer_completed_at=NOW - 21 * MINUTE,
                        finished_at=NOW - 20 * MINUTE)
    BouncerBatch.create(check_type="deliverable", status="outstanding", quantity=7, reserved_at=NOW - 10 * MINUTE,
                        sent_at=NOW - 10 * MINUTE)
    BouncerBatch.create(check_type="catchall", status="rejected", quantity=3, reserved_at=NOW - 30 * MINUTE - MINUTE,
                        finished_at=NOW - 30 * MINUTE)
    BouncerBatch.create(check_type="catchall", status="completed", quantity=4, reserved_at=NOW - 9 * 60 * MINUTE,
                        finished_at=NOW - 8 * 60 * MINUTE)                  # long before the window
    series = chart_series(settings, hours=1, now=NOW)
    slots = series["slot_use"]
    # Point i is the end of step i: NOW - 60 min + (i + 1) min.
    assert slots["deliverable"][19] == 1 and slots["deliverable"][44] == 0 and slots["deliverable"][-1] == 1
    assert slots["catchall"][28] == 1 and slots["catchall"][29] == 0 and sum(slots["catchall"]) == 1
    assert slots["deliverable"][-1] == queue_overview(settings)["check_types"]["deliverable"]["in_flight_batches"]
    assert series["verified_per_minute"]["deliverable"][40] == 10
    verified = series["verified_per_minute"]
    assert sum(verified["deliverable"]) == 10 and sum(verified["catchall"]) == 0
    assert series["results_delay_seconds"][40] == 60.0
    assert [d for d in series["results_delay_seconds"] if d is not None] == [60.0]
    assert (series["max_outstanding"], series["buffer"]) == (settings.max_outstanding, settings.rate_limit_buffer)


def test_charts_break_lines_where_nothing_is_known_and_draw_the_cap():
    from bouncer.web.charts import line_chart, nice_ceiling
    times = ["2026-12-01T11:%02d:00Z" % m for m in range(4)]
    chart = line_chart("delay", times, {"delay": [1.0, None, 3.0, 4.0]}, unit="s", ceiling=(15, "cap 15"))
    assert len(chart.lines[0]["segments"]) == 2 and chart.lines[0]["last"] == 4.0
    assert chart.ceiling[1] == "cap 15" and [label for _, label in chart.y_ticks] == ["0", "10", "20"]
    assert [label for _, label, _ in chart.x_labels] == ["11:00", "11:02", "11:03"]
    assert [nice_ceiling(v) for v in (0.3, 1, 7, 15, 180, 201)] == [0.5, 1, 10, 20, 200, 250]
