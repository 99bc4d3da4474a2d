"""What the run writes down as it goes: what it says, the errors it survives, the violations
it sees. Each is thread-safe: the submitter, the checker and the final checks all record."""
import datetime
import threading
import time

from support.soak.settings import INVARIANTS, KEPT_ERRORS, KEPT_EXAMPLES


def iso(epoch):
    return datetime.datetime.fromtimestamp(epoch).strftime("%H:%M:%S.%f")[:-3]


class Output:
    """Everything the soak says goes to stdout and to soak.log, which is checked for secrets
    like every other log."""

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()

    def say(self, text=""):
        with self.lock:
            print(text, flush=True)
            with open(self.path, "a", encoding="utf-8") as log:
                log.write(text + "\n")


class Errors:
    """Errors that do not stop the run (a failed submission, a check the busy database did not
    answer): counted, the first few kept word for word, so a long run stays small."""

    def __init__(self):
        self.lock = threading.Lock()
        self.count = 0
        self.first = []

    def add(self, where, exc):
        with self.lock:
            self.count += 1
            if len(self.first) < KEPT_ERRORS:
                self.first.append("%s %s: %s: %s" % (iso(time.time()), where, type(exc).__name__, exc))

    def summary(self):
        with self.lock:
            return "%d, first: %s" % (self.count, self.first[0]) if self.count else None


class Violations:
    """Every violation seen, with when it was first seen; the same one seen again by a later
    sample is counted once."""

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        self.seen = {number: {} for number in INVARIANTS}

    def record(self, number, message, when=None):
        when = when or time.time()
        with self.lock:
            known = self.seen[number]
            if message in known:
                return
            if len(known) >= KEPT_EXAMPLES:
                known.setdefault("(more, not kept)", when)
                return
            known[message] = when
            with open(self.path, "a", encoding="utf-8") as log:
                log.write("%s invariant %d: %s\n" % (iso(when), number, message))

    def count(self, number):
        return len(self.seen[number])

    def any(self):
        return any(self.count(number) for number in INVARIANTS)

    def examples(self, number, limit=5):
        items = sorted(self.seen[number].items(), key=lambda item: item[1])
        return [(when, message) for message, when in items[:limit]]
