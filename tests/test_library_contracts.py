"""The places the service leans on a library's internals, one test each: the checklist for a
version bump. A test here failing after an upgrade names the place to look at.

- peewee: `ForeignKeyField(_deferred=True)` makes no constraint (bouncer/store/models.py Reference);
  `Database.rollback` is what `atomic()` calls on an error (bouncer/store/database.py RollbackOnlyWhenOpen),
  and sqlite3's `in_transaction` / psycopg2's `closed` say whether one is still open.
- rq: `HerokuWorker.request_stop_sigrtmin` runs in the horse when the worker is asked to stop,
  `imminent_shutdown_delay` is its grace, `fork_work_horse` forks it, `handle_warm_shutdown_request`
  runs in the worker, with `horse_pid` 0 between jobs (bouncer/runtime/worker.py, which does what
  the last two do without their warnings); its per-job lines are on the `rq.worker` logger
  (bouncer/logs.py).
- rq-scheduler: `Scheduler.scheduled_jobs_key`, `enqueue_jobs`, `remove_lock`, `register_death`
  and `job.meta["interval"]` (bouncer/runtime/schedule.py).
- waitress: `HTTPChannel.parser_class`, `HTTPRequestParser.parse_header` / `received` with
  `command`, `path`, `headers`, `content_length`, `adj.max_request_body_size`, and
  `RequestEntityTooLarge.to_response`; a server's `channel_class`; its `trigger.pull_trigger(thunk)`
  runs the thunk in the server's loop, and `wasyncore.close_all(server._map)` empties that loop
  (bouncer/web/server.py stop_server).
- werkzeug: `LimitedStream.read(0)` is taken for a client that hung up (bouncer/web/submission.py
  HashingStream answers it itself).
- APIFlask: `spec_processor` (the submit body's three forms) and a schema registered once when
  it is also nested (bouncer/web/schemas.py ListedBatch).
- urllib3: the prefix of its connection errors, cut from messages (bouncer/client.py root_reason);
  a connection's `_new_conn` makes its socket from `_dns_host`, `port`, `timeout`,
  `source_address` and `socket_options`, and a pool manager's `pool_classes_by_scheme` names the
  pools it makes (bouncer/news/targets.py PublicOnly).
- ijson: `basic_parse` gives (event, value) pairs with no path (bouncer/doors/reader.py JsonBatch).
- email-validator: an address with a dot-atom ASCII local part is valid exactly when its domain
  is (bouncer/addresses.py PLAIN_ADDRESS); checked against the library over fuzzed addresses in
  tests/test_addresses.py.
"""
import inspect
import io
import sqlite3

import pytest
import rq.worker
import waitress.channel
import waitress.parser
import waitress.utilities
from peewee import IntegerField, Model, SqliteDatabase
from rq_scheduler import Scheduler

from bouncer.store.database import Sqlite
from bouncer.store.models import Reference


def test_peewee_deferred_foreign_key_makes_no_constraint():
    db = SqliteDatabase(":memory:")

    class Parent(Model):
        class Meta:
            database = db

    class Child(Model):
        parent = Reference(Parent)
        n = IntegerField()

        class Meta:
            database = db

    sql, _ = Child._schema._create_table().query()
    assert "REFERENCES" not in sql and "parent_id" in sql


def test_peewee_atomic_rolls_back_through_the_database_rollback(tmp_path):
    calls = []
    real = Sqlite.rollback

    class Counting(Sqlite):
        def rollback(self):
            calls.append(1)
            return real(self)

    db = Counting(str(tmp_path / "x.db"))
    with pytest.raises(RuntimeError):
        with db.atomic():
            db.execute_sql("SELECT 1")
            raise RuntimeError("the work failed")
    assert calls == [1]
    assert hasattr(sqlite3.connect(":memory:"), "in_transaction")


def test_rq_heroku_worker_hooks():
    worker = rq.worker.HerokuWorker
    assert hasattr(worker, "imminent_shutdown_delay")
    assert "request_stop_sigrtmin" in inspect.getsource(worker.setup_work_horse_signals)
    assert callable(worker.fork_work_horse) and worker.log_result_lifespan is True


def test_rq_scheduler_internals():
    assert Scheduler.scheduled_jobs_key == "rq:scheduler:scheduled_jobs"
    for name in ("enqueue_jobs", "remove_lock", "register_death", "get_jobs"):
        assert callable(getattr(Scheduler, name)), name
    assert "interval" in inspect.getsource(Scheduler.schedule)


def test_waitress_parser_and_channel_hooks():
    assert waitress.channel.HTTPChannel.parser_class is waitress.parser.HTTPRequestParser
    parser = waitress.parser.HTTPRequestParser(waitress.adjustments.Adjustments())
    parser.received(b"POST /api/v1/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n"
                    b"Content-Length: 5\r\n\r\n")
    assert (parser.command, parser.path, parser.headers["AUTHORIZATION"], parser.content_length) == (
        "POST", "/api/v1/batches", "Bearer t", 5)
    assert "max_request_body_size" in inspect.getsource(waitress.parser.HTTPRequestParser.received)
    status, headers, body = waitress.utilities.RequestEntityTooLarge("x").to_response()
    assert status.startswith("413")


def test_werkzeug_limited_stream_takes_read_zero_for_a_hang_up():
    from werkzeug.exceptions import ClientDisconnected
    from werkzeug.wsgi import LimitedStream
    stream = LimitedStream(io.BytesIO(b"12345"), 5)
    with pytest.raises(ClientDisconnected):
        stream.read(0)


def test_apiflask_spec_processor_exists():
    from apiflask import APIFlask
    assert callable(APIFlask.spec_processor)


def test_urllib3_connection_error_prefix_is_cut():
    from urllib3.connection import HTTPConnection
    from urllib3.exceptions import NewConnectionError

    from bouncer.client import root_reason
    error = NewConnectionError(HTTPConnection("bouncer.test", 1), "Failed to establish a new connection: refused")
    assert str(error).startswith("HTTPConnection(host='bouncer.test', port=1): ")
    assert root_reason(error) == "Failed to establish a new connection: refused"


def test_rq_warm_shutdown_and_horse_stop_hooks():
    worker = rq.worker.HerokuWorker
    assert "horse_pid" in inspect.getsource(worker.handle_warm_shutdown_request)
    source = inspect.getsource(worker.request_stop_sigrtmin)
    assert "request_force_stop_sigrtmin" in source and "signal.alarm(self.imminent_shutdown_delay)" in source
    assert rq.worker.Worker.__module__.startswith("rq.worker")   # its logger: rq.worker


def test_waitress_trigger_runs_a_thunk_in_the_loop_and_close_all_empties_it():
    from waitress import wasyncore
    from waitress.trigger import trigger
    assert "thunk" in inspect.signature(trigger.pull_trigger).parameters
    assert "map.clear()" in inspect.getsource(wasyncore.close_all)


def test_urllib3_new_conn_and_pool_classes():
    from urllib3.connection import HTTPConnection
    from urllib3.poolmanager import PoolManager
    source = inspect.getsource(HTTPConnection._new_conn)
    for name in ("self._dns_host", "self.port", "self.timeout", "self.source_address", "self.socket_options"):
        assert name in source, name
    assert set(PoolManager().pool_classes_by_scheme) == {"http", "https"}


def test_ijson_basic_parse_events_have_no_path():
    import ijson
    events = list(ijson.basic_parse(io.BytesIO(b'{"emails": [["x"]]}'), use_float=True))
    assert events[:4] == [("start_map", None), ("map_key", "emails"), ("start_array", None), ("start_array", None)]
