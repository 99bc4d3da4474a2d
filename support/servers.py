"""Throwaway servers on loopback, and the claims that keep shared ones apart.

- `RedisServer`: a redis-server of a test's own on a free port, which it can crash, restart
  (empty: no persistence) and stop, never touching the Redis other tests use.
- `PostgresCluster`: a PostgreSQL cluster of its own on a free port, restartable under an open
  transaction.
- `RedisClaims`: which Redis database number a test session or a soak run uses on a shared
  server, claimed across processes so that none flushes another's data.
"""
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import redis as redis_lib

from support.ports import HOST, free_port
from support.processes import Process
from support.waiting import wait_until

STARTUP_TIMEOUT = 15
COMMAND_TIMEOUT = 60
IS_ROOT = os.geteuid() == 0


class Unavailable(Exception):
    """This machine lacks what a server needs (its programs, a user to run it as): a test
    skips, or fails, saying which."""


# -- Redis ------------------------------------------------------------------------------------

class RedisServer:
    """redis-server in the foreground on a free port, no persistence: a restart comes back empty."""

    def __init__(self, directory):
        if shutil.which("redis-server") is None:
            raise Unavailable("redis-server is not installed (scripts/test installs it)")
        self.port = free_port()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = None
        self.url = "redis://%s:%d/0" % (HOST, self.port)
        self.client = redis_lib.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)

    def start(self):
        self.process = Process("redis", [
            "redis-server", "--port", str(self.port), "--bind", HOST, "--save", "",
            "--appendonly", "no", "--daemonize", "no", "--dir", str(self.directory)],
            self.directory / "redis.log")
        wait_until(self.answers, "redis-server on port %d to answer" % self.port, STARTUP_TIMEOUT)
        return self

    def answers(self):
        try:
            return self.client.ping()
        except redis_lib.RedisError:
            return False

    def crash(self):
        """SIGKILL: what a crashed or replaced Redis instance looks like to its clients."""
        self.process.kill()

    def stop(self):
        if self.process is not None and self.process.is_running():
            self.crash()
        self.client.close()


class RedisClaims:
    """Claims on the database numbers of one Redis server, kept in its database 0 as
    `bouncer-tests:db:<n>` = owner (`<pid>` or `<label>-<pid>`), with an expiry. A claim whose
    owner process is gone (a session killed before it could release it) is taken over."""

    def __init__(self, url, connect_timeout=5):
        # The URL's own database number wins over a `db=` argument in redis-py: rewrite the path.
        registry_url = urlunsplit(urlsplit(url)._replace(path="/0"))
        self.registry = redis_lib.Redis.from_url(registry_url, socket_connect_timeout=connect_timeout)

    def claim(self, number, owner, seconds):
        """Whether `owner` now holds database `number` (for `seconds`, unless released)."""
        return bool(self.registry.set(claim_key(number), owner, nx=True, ex=int(seconds))
                    or self.take_over_stale(number, owner, seconds))

    def claim_any(self, owner, seconds, numbers=range(1, 16)):
        """The first of `numbers` that `owner` could claim, or None."""
        return next((number for number in numbers if self.claim(number, owner, seconds)), None)

    def holder(self, number):
        return (self.registry.get(claim_key(number)) or b"").decode()

    def release(self, number, owner):
        """Only a claim `owner` still holds: one taken over meanwhile stays."""
        if self.holder(number) == owner:
            self.registry.delete(claim_key(number))

    def close(self):
        self.registry.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def take_over_stale(self, number, owner, seconds):
        key, holder = claim_key(number), self.holder(number)
        if not holder or owner_alive(holder):
            return False
        # Only if it still names the same dead owner: another claimant may have been quicker.
        with self.registry.pipeline() as pipe:
            try:
                pipe.watch(key)
                if (pipe.get(key) or b"").decode() != holder:
                    return False
                pipe.multi()
                pipe.set(key, owner, ex=int(seconds))
                pipe.execute()
                return True
            except redis_lib.WatchError:
                return False


def claim_key(number):
    return "bouncer-tests:db:%d" % number


def owner_alive(owner):
    """Whether the process an owner string names still runs. An owner that names no pid we
    understand is taken to be alive: its claim is never taken over."""
    try:
        os.kill(int(owner.rsplit("-", 1)[-1]), 0)
    except ValueError:
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True      # someone else's live process
    return True


# -- PostgreSQL -------------------------------------------------------------------------------

def postgres_programs():
    """The directory holding initdb and pg_ctl: on PATH, or Debian's newest versioned one."""
    if shutil.which("pg_ctl") and shutil.which("initdb"):
        return Path(shutil.which("pg_ctl")).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                   key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit() else 0)
    if not found:
        raise Unavailable("PostgreSQL's server programs are not installed (scripts/test installs them)")
    return Path(found[-1])


class PostgresCluster:
    """A throwaway cluster on a free port with trust authentication (a password in the URL is
    accepted and ignored, which is enough to check that none is ever shown). PostgreSQL refuses
    to run as root, so as root it runs as the `postgres` user from a directory under /tmp."""

    def __init__(self):
        self.bin = postgres_programs()
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="bouncer-faults-pg-", dir="/tmp"))
        self.data = self.directory / "data"
        if IS_ROOT:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.directory, ignore_errors=True)
                raise Unavailable("no `postgres` user to run PostgreSQL as (scripts/test creates it)") from None
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)

    def as_owner(self, program, *args):
        command = [str(self.bin / program), *[str(a) for a in args]]
        return ["runuser", "-u", "postgres", "--", *command] if IS_ROOT else command

    def pg_ctl(self, *args):
        subprocess.run(self.as_owner("pg_ctl", "-D", self.data, "-w", "-t", 30, *args),
                       check=True, capture_output=True, timeout=COMMAND_TIMEOUT)

    @property
    def server_options(self):
        return ("-p %d -k %s -c listen_addresses=%s -c fsync=off"
                % (self.port, self.directory, HOST))

    def start(self):
        subprocess.run(self.as_owner("initdb", "-D", self.data, "-A", "trust", "-U", "postgres"),
                       check=True, capture_output=True, timeout=COMMAND_TIMEOUT)
        self.pg_ctl("-l", self.directory / "server.log", "-o", self.server_options, "start")
        return self

    def restart(self):
        """Fast mode: every backend is terminated, open transactions with it."""
        self.pg_ctl("-l", self.directory / "server.log", "-m", "fast", "-o", self.server_options,
                    "restart")

    def stop(self):
        self.pg_ctl("-m", "fast", "stop")

    def destroy(self):
        subprocess.run(self.as_owner("pg_ctl", "-D", self.data, "-m", "immediate", "stop"),
                       capture_output=True, timeout=COMMAND_TIMEOUT)
        shutil.rmtree(self.directory, ignore_errors=True)

    def create_database(self, name, password=None):
        """The new database's URL (with `password` in it, when given)."""
        postgres_admin("postgresql://postgres@%s:%d/postgres" % (HOST, self.port),
                       'CREATE DATABASE "%s"' % name)
        user = "postgres:%s" % password if password else "postgres"
        return "postgresql://%s@%s:%d/%s" % (user, HOST, self.port, name)


def postgres_admin(url, statement, parameters=None):
    """One statement run outside a transaction (CREATE and DROP DATABASE need that) on the
    server of `url`, connected to its `postgres` database; the rows it returns, if any."""
    parts = urlsplit(url)
    admin = psycopg2.connect(host=parts.hostname, port=parts.port or 5432,
                             user=parts.username or "postgres", password=parts.password,
                             dbname="postgres", connect_timeout=10)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(statement, parameters)
            return cursor.fetchall() if cursor.description else []
    finally:
        admin.close()
