"""Cycle locks: one creation cycle and one status cycle per check type at a time, whatever the
number of workers. A Redis lock with a short expiry, renewed by a thread while its holder works,
so a holder killed with -9 frees it within LOCK_TIMEOUT seconds. A renewal that fails sets
`lost`, which the cycle reads between its steps (see runner.Cycle.stop_reason)."""

import logging
import threading

from redis.exceptions import LockError, RedisError

from bouncer.names import lock_key

log = logging.getLogger(__name__)


LOCK_TIMEOUT = 60


class CycleLock:
    """`with CycleLock(redis, 'creation', 'deliverable') as held:` -- held is False when another
    process has it (the caller logs and returns); `lost` turns True if renewal ever fails."""

    def __init__(self, redis, kind, check_type, timeout=LOCK_TIMEOUT):
        self.name = lock_key(kind, check_type)
        self.timeout = timeout
        # thread_local=False: the renewal thread must see the token the main thread acquired.
        self.lock = redis.lock(self.name, timeout=timeout, blocking=False, thread_local=False)
        self.stop = threading.Event()
        self.renewer = None
        self.held = False
        self.lost = False

    def __enter__(self):
        self.held = bool(self.lock.acquire())
        if self.held:
            self.renewer = threading.Thread(target=self.keep_renewing, name=self.name, daemon=True)
            self.renewer.start()
        return self.held

    def keep_renewing(self):
        while not self.stop.wait(self.timeout / 3):
            try:
                self.lock.reacquire()
            except (LockError, RedisError) as exc:
                self.lost = True
                log.error("Lock %s lost while working (%s); the cycle stops at its next step",
                          self.name, exc)
                return

    def __exit__(self, *exc_info):
        if not self.held:
            return False
        self.stop.set()
        self.renewer.join()
        try:
            self.lock.release()
        except (LockError, RedisError) as exc:
            # Expired or Redis gone: the lock frees itself anyway.
            log.warning("Lock %s was not released cleanly: %s", self.name, exc)
        return False

