"""Bouncer's throughput, as its docs describe it: an account verifies about 100,000 to 200,000
addresses an hour, and "up to 25 batches will be processed in parallel". Modelled as processor
sharing: the account's rate is split equally between the batches it processes at once (at most
`parallel`), and the others wait, queued, in the order they came. So a batch's completion time
depends on the load: alone, 10,000 addresses at 150,000 an hour take 4 minutes; beside 14
others, an hour.

Times are monotonic seconds, given by the caller. Thread-safe: one lock, taken by every method.
"""
import threading
from collections import deque

DONE = 1e-6     # addresses left below which a batch is done (float arithmetic)


class Account:
    def __init__(self, per_hour, parallel):
        self.rate = per_hour / 3600.0            # addresses a second, all batches together
        self.parallel = parallel
        self.clock = None                        # up to when the work was moved on
        self.waiting = deque()                   # batch ids not yet started, in order
        self.left = {}                           # batch id: addresses left, while processing
        self.started, self.finished = {}, {}     # batch id: monotonic time
        self._lock = threading.Lock()

    def add(self, batch_id, addresses, now):
        """A batch of `addresses` distinct addresses arrives at `now`."""
        with self._lock:
            self._advance(now)
            self.waiting.append((batch_id, addresses))
            self._start_waiting(now)

    def complete(self, batch_id, now):
        """The batch is done now, whatever was left (a test's complete_now, a finish)."""
        with self._lock:
            self._advance(now)
            self.waiting = deque(item for item in self.waiting if item[0] != batch_id)
            self.left.pop(batch_id, None)
            self.started.setdefault(batch_id, now)
            self.finished.setdefault(batch_id, now)
            self._start_waiting(now)

    def forget(self, batch_id, now):
        """The batch is gone (deleted): it takes no more of the account's time."""
        with self._lock:
            self._advance(now)
            self.waiting = deque(item for item in self.waiting if item[0] != batch_id)
            self.left.pop(batch_id, None)
            self._start_waiting(now)

    def state(self, batch_id, now):
        """(phase, monotonic start or None, monotonic end or None, addresses left or None)."""
        with self._lock:
            self._advance(now)
            if batch_id in self.finished:
                return "completed", self.started[batch_id], self.finished[batch_id], 0
            if batch_id in self.left:
                return "processing", self.started[batch_id], None, self.left[batch_id]
            return "queued", None, None, None

    def load(self, now):
        """(batches processing, batches waiting)."""
        with self._lock:
            self._advance(now)
            return len(self.left), len(self.waiting)

    def _advance(self, now):
        """Move the work on to `now`, batch completion by batch completion."""
        if self.clock is None:
            self.clock = now
        while self.left and self.clock < now:
            share = self.rate / len(self.left)
            step = min(min(self.left.values()) / share, now - self.clock)
            self.clock += step
            for batch_id in list(self.left):
                self.left[batch_id] -= share * step
                if self.left[batch_id] <= DONE:
                    del self.left[batch_id]
                    self.finished[batch_id] = self.clock
            self._start_waiting(self.clock)
        self.clock = max(self.clock, now)

    def _start_waiting(self, now):
        while self.waiting and len(self.left) < self.parallel:
            batch_id, addresses = self.waiting.popleft()
            self.started[batch_id] = now
            if addresses > 0:
                self.left[batch_id] = float(addresses)
            else:
                self.finished[batch_id] = now
