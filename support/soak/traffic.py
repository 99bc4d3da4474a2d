"""What the soak submits: addresses as users hold them, user batches of them, and the thread
that sends them in, through the library and the CLI."""
import collections
import json
import random
import threading
import time

from bouncer.doors.loading import create_user_batch
from bouncer.states import RowState
from bouncer.store.database import database, utcnow
from bouncer.store.models import UserBatchEmail
from support.soak.records import Errors
from support.soak.settings import CHECK_TYPES, CLI_SHARE, COMMAND_LIMIT, MAX_BACKLOG, USERS

DOMAINS = ("example.com", "example.org", "example.net", "acme.io", "yahoo.com")
SANDBOX_NAMES = ("deliverable", "undeliverable", "accept-all", "disposable", "free", "unknown",
                 "other", "role")
# Valid syntax, awkward for whoever builds JSON or SQL by hand.
UNUSUAL = ("o'brien{n}@example.com", "ünïcödé{n}@example.com", "josé.{n}@exämple.com",
           "a&b{n}+x@example.org", "日本{n}@example.jp", "{{curly{n}}}|~@example.net")
# Each fails the syntax check: kept as an invalid row, never sent.
INVALID = ("back\\slash{n}@example.com", "not an address {n}", "missing-at-{n}.example.com",
           "user{n}@localhost", '"quoted{n}"@example.com', "two@@{n}.example.com")


class AddressBook:
    """Addresses for user batches: mostly new, some seen before (so several users hold the same
    mailbox), each reuse spelled as the provider allows (Gmail dots and +tags, googlemail.com,
    Outlook +tags, case)."""

    def __init__(self, rng):
        self.rng = rng
        self.seen = []
        self.count = 0

    def pick(self):
        if self.seen and self.rng.random() < 0.25:
            return self.spelling(self.rng.choice(self.seen))
        self.count += 1
        mailbox = self.new_mailbox(self.count)
        self.seen.append(mailbox)
        return self.spelling(mailbox)

    def new_mailbox(self, n):
        roll = self.rng.random()
        if roll < 0.15:
            return ("gmail", n)
        if roll < 0.2:
            return ("outlook", n)
        if roll < 0.25:
            return ("unusual", self.rng.choice(UNUSUAL).format(n=n))
        if roll < 0.28:
            return ("sandbox", self.rng.choice(SANDBOX_NAMES))
        return ("plain", "user%d@%s" % (n, self.rng.choice(DOMAINS)))

    def spelling(self, mailbox):
        kind, value = mailbox
        rng = self.rng
        if kind == "gmail":
            # All of these strip to first<n>last@gmail.com.
            return rng.choice(("first{n}.last@gmail.com", "First{n}.Last+news@gmail.com",
                               "f.irst{n}last@googlemail.com", "FIRST{n}LAST+x{t}@gmail.com")
                              ).format(n=value, t=rng.randint(1, 9))
        if kind == "outlook":
            return rng.choice(("user{n}@outlook.com", "user{n}+tag{t}@outlook.com",
                               "User{n}@Outlook.com")).format(n=value, t=rng.randint(1, 9))
        if kind == "sandbox":
            return "%s+%d@sandbox.usebouncer.com" % (value, rng.randint(1, 99))
        return value.upper() if rng.random() < 0.1 else value

    def invalid(self):
        self.count += 1
        return self.rng.choice(INVALID).format(n=self.count)


def batch_size(rng):
    """1..300, mostly small: many small user batches, now and then a large one."""
    roll = rng.random()
    if roll < 0.5:
        return rng.randint(1, 10)
    if roll < 0.85:
        return rng.randint(11, 100)
    return rng.randint(101, 300)


def user_batch_rows(rng, book):
    """The rows of one user batch: at least one valid address, sometimes a repeat within the
    batch, sometimes a few invalid rows."""
    rows = [book.pick() for _ in range(batch_size(rng))]
    if rng.random() < 0.1:
        rows.append(rng.choice(rows))
    invalid = [book.invalid() for _ in range(rng.randint(1, 3))] if rng.random() < 0.3 else []
    for row in invalid:
        rows.insert(rng.randint(0, len(rows)), row)
    return rows, len(invalid)


Submission = collections.namedtuple(
    "Submission", "batch_id user check_type rows accepted invalid expected_invalid duplicates via visible_at")


class Submitter(threading.Thread):
    """Submits user batches until its deadline, through the library (the code path of every app)
    and now and then through the CLI, waiting whenever the backlog is large enough that the
    drain at the end could not finish in time."""

    def __init__(self, soak, deadline):
        super().__init__(name="submitter", daemon=True)
        self.soak = soak
        self.deadline = deadline
        self.rng = random.Random(soak.options.seed)
        self.book = AddressBook(self.rng)
        self.submissions = []
        self.errors = Errors()
        self.lock = threading.Lock()
        self.ended = None

    def run(self):
        while time.monotonic() < self.deadline and not self.soak.stopping.is_set():
            try:
                if queued_rows() > MAX_BACKLOG:
                    self.soak.stopping.wait(1)
                    continue
                self.submit_one()
            except Exception as exc:  # reported in the table; the run goes on
                self.errors.add("submit", exc)
            self.soak.stopping.wait(self.rng.uniform(0.2, 1.2))
        self.ended = time.monotonic()

    def submit_one(self):
        rows, expected_invalid = user_batch_rows(self.rng, self.book)
        user = "user-%02d" % self.rng.randint(1, USERS)
        check_type = self.rng.choice(CHECK_TYPES)
        via = "cli" if self.rng.random() < CLI_SHARE else "library"
        answer = (self.submit_by_cli if via == "cli" else self.submit_by_library)(user, check_type, rows)
        submission = Submission(answer["batch_id"], user, check_type, len(rows), answer["accepted"],
                                answer["invalid"], expected_invalid, answer["duplicates"], via,
                                utcnow())
        with self.lock:
            self.submissions.append(submission)

    def submit_by_library(self, user, check_type, rows):
        with database.connection_context():
            return create_user_batch(user, check_type, rows).as_json()

    def submit_by_cli(self, user, check_type, rows):
        done = self.soak.services.run("submit", "-", "--user", user, "--check-type", check_type,
                                      "--json", stdin="\n".join(rows) + "\n", log="submit-cli",
                                      timeout=COMMAND_LIMIT)
        if done.returncode != 0:
            raise RuntimeError("`bouncer submit` exited %d; see submit-cli.log" % done.returncode)
        return json.loads(done.stdout)

    def snapshot(self):
        with self.lock:
            return list(self.submissions)


def queued_rows():
    with database.connection_context():
        return UserBatchEmail.select().where(UserBatchEmail.status == RowState.QUEUED).count()
