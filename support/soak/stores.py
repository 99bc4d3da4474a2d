"""The run's database and Redis database: fresh at the start, nobody else's, cleaned up after."""
import contextlib
import os
import secrets
from urllib.parse import urlsplit, urlunsplit

import redis as redis_lib

from bouncer.store.database import database
from support.servers import RedisClaims, postgres_admin


@contextlib.contextmanager
def fresh_database(url, run_dir, keep=False):
    """The run's database URL: SQLite in the run directory by default, or a new PostgreSQL
    database named after the given one (never an existing one, so no data is at risk), dropped
    at the end unless `keep`."""
    if not url:
        yield "sqlite:///%s" % (run_dir / "soak.db")
    elif url.startswith("sqlite:///"):
        yield fresh_sqlite_url(url)
    elif url.startswith(("postgres://", "postgresql://")):
        with fresh_postgres_database(url, keep) as fresh:
            yield fresh
    else:
        raise SystemExit("--database-url must be sqlite:///FILE or postgresql://...")


def fresh_sqlite_url(url):
    # Absolute: the services run from the repository root, the soak from anywhere.
    path = os.path.abspath(url[len("sqlite:///"):])
    if os.path.exists(path):
        raise SystemExit("%s exists: a soak run needs a fresh database" % path)
    return "sqlite:///%s" % path


@contextlib.contextmanager
def fresh_postgres_database(url, keep):
    parts = urlsplit(url)
    name = "%s_%s" % (parts.path.lstrip("/") or "bouncer_soak", secrets.token_hex(4))
    postgres_admin(url, 'CREATE DATABASE "%s"' % name)
    try:
        yield urlunsplit(parts._replace(path="/" + name))
    finally:
        if not database.is_closed():
            database.close()
        if not keep:
            postgres_admin(url, 'DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)


@contextlib.contextmanager
def claimed_redis(url, seconds):
    """The Redis database of the run, flushed. Test sessions claim their database numbers in
    database 0 (tests/conftest.py); the soak claims its own the same way, so neither flushes
    the other's."""
    connection = redis_lib.Redis.from_url(url, socket_connect_timeout=5)
    number = connection.connection_pool.connection_kwargs.get("db", 0)
    claims, owner, owned = RedisClaims(url), "soak-%d" % os.getpid(), False
    try:
        if number and not claims.claim(number, owner, seconds):
            raise SystemExit("Redis database %d is claimed by %s (a running test session or "
                             "soak); pass --redis-url with another database"
                             % (number, claims.holder(number) or "?"))
        owned = True
        connection.flushdb()
        yield url
    finally:
        # Only a database this run owns is flushed: a refused claim leaves it as it was.
        with contextlib.suppress(redis_lib.RedisError):
            if owned:
                connection.flushdb()
            if owned and number:
                claims.release(number, owner)
        connection.close()
        claims.close()
