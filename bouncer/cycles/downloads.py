"""Downloads under way in a status cycle: a large one fetched and read by a process of its own
while the cycle ingests the one before it, a small one fetched by the cycle itself.

The reading is Python work, so a thread would take turns with the ingest at Python's lock; a
forked process runs beside it on another core and sends back what it read (measured on 150k
results: pickling and unpickling a download costs about a fifth of reading it). A process that
ends without an answer (killed, say) is a failed download: its batch waits for the next cycle.
"""

import logging
import multiprocessing
import signal
from collections import deque

from bouncer.cycles import ingest
from bouncer.errors import BouncerError
from bouncer.logs import ids
from bouncer.store.database import let_go_after_fork

log = logging.getLogger(__name__)


FETCH_AHEAD = 1     # downloads fetched while the batch before them is ingested
APART_FROM = 2000   # addresses: a download this large is fetched by a process of its own


class Downloads:
    """Downloads under way, in the order they were started: a large one fetched and read by a
    process of its own (FetchedApart) while the cycle ingests the one before it, a small one
    fetched by the cycle at once (Fetched)."""

    def __init__(self, client):
        self.client, self.waiting = client, deque()
        self.started = 0   # downloads started in this cycle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # What was not ingested is left for the next cycle.
        for _, fetch in self.waiting:
            fetch.abandon()

    def __len__(self):
        return len(self.waiting)

    def ingest_due(self, started_one):
        """Time to ingest the oldest download: more than FETCH_AHEAD are under way, or the newest
        is already here, or the last check started none and the oldest has arrived (nothing
        would run beside its ingest, and the checks of batches still at Bouncer need not hold
        up a completed one's results)."""
        if not self.waiting:
            return False
        return (len(self.waiting) > FETCH_AHEAD or isinstance(self.waiting[-1][1], Fetched)
                or (not started_one and self.waiting[0][1].arrived()))

    def start(self, batch):
        self.started += 1
        fetch = None
        if batch.quantity >= APART_FROM:
            try:
                fetch = FetchedApart(self.client, batch)
            except (OSError, ValueError) as exc:   # no process to be had (memory, limits, no fork)
                log.warning("Bouncer batch %s (%s): downloading it in the cycle itself: %s", batch.bouncer_id,
                            batch.id, exc, extra=ids(ledger_id=batch.id, bouncer_id=batch.bouncer_id))
        self.waiting.append((batch, fetch or Fetched(self.client, batch)))

    def next(self):
        """(batch, fetch) of the oldest download: `fetch.result()` waits for its ingest.Download,
        or raises the BouncerError met."""
        return self.waiting.popleft()


def read_batch_download(client, batch):
    """The batch's download, read into the columns it stores."""
    return ingest.read_download(client.download_batch(batch.check_type, batch.bouncer_id))


class Fetched:
    """A download the cycle fetched itself."""

    def __init__(self, client, batch):
        self.download = self.error = None
        try:
            self.download = read_batch_download(client, batch)
        except BouncerError as exc:
            self.error = exc

    def arrived(self):
        return True

    def result(self):
        if self.error is not None:
            raise self.error
        return self.download

    def abandon(self):
        pass


class FetchedApart:
    """A download fetched and read by a forked process, which sends back the ingest.Download (or
    the BouncerError it met) through a pipe and ends."""

    def __init__(self, client, batch):
        self.batch = batch
        context = multiprocessing.get_context("fork")
        self.answers, answer = context.Pipe(duplex=False)
        # Not a daemon: a cycle may run in a daemonic process itself; it ends its children itself.
        self.process = context.Process(target=fetch_apart, args=(client, batch, answer),
                                       name="download-%s" % batch.id)
        try:
            self.process.start()
        finally:
            answer.close()   # the child's end: the pipe ends when the child does

    def arrived(self):
        """The process has answered (or ended): result() will not wait for the download."""
        return self.answers.poll()

    def result(self):
        try:
            outcome, value = self.answers.recv()
        except (EOFError, OSError):
            outcome, value = "error", BouncerError(
                "Bouncer download of batch %s: the process fetching it ended without an answer (exit %s)"
                % (self.batch.bouncer_id, self.wait()), operation="download")
        finally:
            self.answers.close()
            self.wait()
        if outcome == "failed":
            raise RuntimeError("Bouncer download of batch %s failed in its process: %s"
                               % (self.batch.bouncer_id, value))
        if outcome == "error":
            raise value
        return value

    def wait(self):
        self.process.join()
        return self.process.exitcode

    def abandon(self):
        self.process.kill()
        self.answers.close()
        self.wait()


def fetch_apart(client, batch, answer):
    """In the forked process: fetch and read one download, send what came of it."""
    # SIGTERM ends this process (the cycle's handler would only ask it to stop between batches);
    # Ctrl-C is the cycle's to handle, which ends this process when it no longer needs it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    let_go_after_fork()
    client.use_own_connections()
    try:
        outcome = ("download", read_batch_download(client, batch))
    except BouncerError as exc:
        outcome = ("error", exc)
    except Exception as exc:
        outcome = ("failed", "%s: %s" % (type(exc).__name__, exc))
    try:
        answer.send(outcome)
    except OSError:
        pass   # the cycle is gone (killed): nobody is waiting for this download

