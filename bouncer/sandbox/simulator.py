"""Bouncer itself, without HTTP: one method, `answer`, takes one request and gives its reply.

It speaks the documented create / status / download / delete / finish lifecycle and the credits
endpoint (see bouncer-api.md), answers Bouncer's sandbox addresses the way Bouncer does, gives
every other address a verdict derived from a hash of it (the same address always gets the same
verdict), can greylist a share of addresses (`unknown` with a `retryAfter` on the first try, the
real verdict on a try after it), and can inject faults (5xx, 429, slow answers) at random with a
seed or on demand from a test. server.py carries it over real HTTP or behind `responses`; the
controls tests use are the same either way.

Standard library only: one lock around the batches, timers for completion callbacks.
"""
import copy
import hashlib
import hmac
import json
import logging
import random
import threading
import time
import urllib.request
import uuid
from collections import Counter, namedtuple
from dataclasses import replace
from datetime import datetime, timezone
from http import HTTPStatus
from urllib.parse import urlsplit

from bouncer.sandbox.account import Account
from bouncer.sandbox.options import SandboxOptions

logger = logging.getLogger("bouncer.sandbox")

MAX_BATCH_SIZE = 100_000
# What the credits endpoint shows an account with no limit set.
UNLIMITED_CREDITS = 1_000_000
SANDBOX_DOMAIN = "sandbox.usebouncer.com"
REQUEST_KINDS = ("create", "status", "download", "finish", "delete", "other")
DOWNLOAD_FILTERS = ("all", "deliverable", "risky", "undeliverable", "unknown")
CALLBACK_HOSTS = ("127.0.0.1", "localhost")
CALLBACK_TIMEOUT = 2.0
# A batch leaves "queued" after this share of its processing time, capped so long runs still move.
START_SHARE = 0.25
MAX_START_DELAY = 5.0
# With --throughput, how often the account's completions are looked for, to post their callbacks.
CALLBACK_TICK = 0.1

FREE_DOMAINS = frozenset({"gmail.com", "yahoo.com", "outlook.com", "hotmail.com"})
ROLE_LOCAL_PARTS = frozenset({
    "admin", "contact", "hello", "help", "info", "marketing", "noreply", "office", "sales",
    "support", "team",
})
PROVIDERS = {
    "gmail.com": "google.com",
    "outlook.com": "outlook.com",
    "hotmail.com": "outlook.com",
    "yahoo.com": "yahoo.com",
}

# Bouncer's own wording where the docs give it; anything else is plainly an injected fault.
FAULT_MESSAGES = {402: "0 credits left", 429: "too many requests"}
NOT_COMPLETED = "batch is not completed"
# A download 405 with this message is final: the results are gone (bouncer-api.md; Bouncer's Java
# SDK handles it). The exact wording is not documented, so clients should match it leniently.
RESULTS_REMOVED = "batch email addresses and results have been removed"
NOT_RUNNING = "batch has to be running to finish"
NOT_DELETABLE = "batch cannot be deleted in current state"
GREYLISTED = {"status": "unknown", "reason": "timeout", "score": 0}
# Faults whose answer comes late: the request is acted on, its answer only after slow_seconds.
DELAYED_FAULTS = ("slow", "timeout")

# One answer. `fault` names what was injected (None, "slow", "timeout", "429", ...); `error`, an
# exception class, means the request got no answer at all: the transport fails it that way.
Reply = namedtuple("Reply", "status body content_type fault error", defaults=(None, None))
Request = namedtuple("Request", "method path query api_key body action batch_id kind")
# ---------------------------------------------------------------------------------------------
# Verdicts


def verdict(status, reason, score, **flags):
    """A verdict: status, reason, score and the six yes/no/unknown flags (default "no")."""
    result = {"status": status, "reason": reason, "score": score}
    for name in ("acceptAll", "disposable", "free", "role", "disabled", "fullMailbox"):
        result[name] = flags.get(name, "no")
    return result


# Bouncer verifies these for free with fixed answers; the local part may carry a `+suffix`.
SANDBOX_VERDICTS = {
    "deliverable": verdict("deliverable", "accepted_email", 100),
    "undeliverable": verdict("undeliverable", "rejected_email", 0),
    "accept-all": verdict("risky", "low_deliverability", 50, acceptAll="yes"),
    "disposable": verdict("risky", "low_quality", 30, disposable="yes"),
    "free": verdict("deliverable", "accepted_email", 100, free="yes"),
    "unknown": verdict("unknown", "unavailable_smtp", 50, acceptAll="unknown"),
    "other": verdict("undeliverable", "invalid_email", 0),
    "role": verdict("deliverable", "accepted_email", 90, role="yes"),
}


def split_address(email):
    """(local part, domain), both lowercased; the domain is "" when there is no `@`."""
    local, at, domain = email.strip().lower().rpartition("@")
    return (local, domain) if at else (domain, "")


def verdict_for(email):
    """The verdict for one address: fixed for sandbox addresses, hash-derived for the rest."""
    local, domain = split_address(email)
    if domain == SANDBOX_DOMAIN:
        fixed = SANDBOX_VERDICTS.get(local.split("+", 1)[0])
        if fixed is not None:
            return dict(fixed)
    if not local or not domain:
        return verdict("undeliverable", "invalid_email", 0)
    return hashed_verdict(email, local, domain)


def hashed_verdict(email, local, domain):
    """About 70% deliverable, 10% risky, 12% undeliverable, 8% unknown, stable per address."""
    digest = hashlib.sha256(email.strip().lower().encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:2], "big") % 100
    pick, jitter = digest[2], digest[3] % 11
    free = "yes" if domain in FREE_DOMAINS else "no"
    role = "yes" if local.split("+", 1)[0] in ROLE_LOCAL_PARTS else "no"
    if bucket < 70:
        return verdict("deliverable", "accepted_email", 90 + jitter, free=free, role=role)
    if bucket < 80:
        return risky_verdict(free, role, 40 + jitter)
    # Only mailbox-level reasons: a domain-level one (invalid_domain, dns_error) for a single
    # address would contradict its neighbours at the same domain.
    if bucket < 92:
        reason = ("invalid_email", "rejected_email")[pick % 2]
        return verdict("undeliverable", reason, 0, free=free, role=role)
    reason = ("unavailable_smtp", "timeout", "unknown")[pick % 3]
    return verdict("unknown", reason, 20 + jitter, free=free, role=role, acceptAll="unknown")


def risky_verdict(free, role, score):
    # Free mailbox providers are never accept-all; their risky mailboxes are full ones.
    if free == "yes":
        return verdict("risky", "low_deliverability", score, free=free, role=role,
                       fullMailbox="yes")
    return verdict("risky", "low_deliverability", score, role=role, acceptAll="yes")


def is_greylisted(email, rate):
    """Whether the receiving server of `email` greylists it: a stable share `rate` of the
    addresses (never a sandbox address: those have fixed answers)."""
    local, domain = split_address(email)
    if not rate or domain == SANDBOX_DOMAIN:
        return False
    digest = hashlib.sha256(("greylist:" + email.strip().lower()).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") < rate * 2 ** 32


def build_record(item, retry_after=None):
    """One download record, shaped like Bouncer's, for an item as it was sent; greylisted
    (`unknown`, `timeout`, tried again not before `retry_after`, epoch seconds) when given."""
    email = item["email"]
    found = verdict_for(email)
    if retry_after is not None:
        found.update(GREYLISTED, acceptAll="unknown")
    domain = split_address(email)[1]
    record = {"email": email}
    if item.get("name") is not None:
        record["name"] = item["name"]
    record.update({
        "status": found["status"],
        "reason": found["reason"],
        "domain": {"name": domain, "acceptAll": found["acceptAll"],
                   "disposable": found["disposable"], "free": found["free"]},
        "account": {"role": found["role"], "disabled": found["disabled"],
                    "fullMailbox": found["fullMailbox"]},
        "dns": dns_for(domain),
        "provider": PROVIDERS.get(domain, domain),
        "score": found["score"],
        "toxic": "unknown",
        "toxicity": 0,
        "didYouMean": None,
        "retryAfter": iso_utc(retry_after) if retry_after is not None else None,
    })
    return record


def dns_for(domain):
    if not domain:
        return {"type": "none", "record": ""}
    return {"type": "MX", "record": "mx.%s." % domain}


# ---------------------------------------------------------------------------------------------
# Replies and request parsing


def json_reply(status, payload):
    return Reply(status, json.dumps(payload).encode("utf-8"), "application/json")


def error_reply(status, message):
    """A Bouncer-style error body: {"status", "error", "message"}."""
    return json_reply(status, {"status": status, "error": reason_phrase(status),
                               "message": message})


def dropped_reply(error):
    """No answer: the transport fails the request with `error` (an exception class)."""
    return Reply(None, b"", "", error.__name__, error)


def raw_reply(status, body):
    """A test-supplied body: bytes or str sent as is (may be non-JSON), or a dict/list as JSON."""
    if isinstance(body, (dict, list)):
        return json_reply(status, body)
    if isinstance(body, str):
        body = body.encode("utf-8")
    return Reply(status, bytes(body), "text/plain; charset=utf-8")


def reason_phrase(status):
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def parse_route(path):
    """(action, batch id) from the path's suffix, whatever prefix precedes `/batch`.

    The catchall check type is configured with its own prefix, so only the tail is significant.
    """
    parts = [part for part in path.split("/") if part]
    if parts[-1:] == ["batch"]:
        return "create", None
    if len(parts) >= 3 and parts[-3] == "batch" and parts[-1] in ("download", "finish"):
        return parts[-1], parts[-2]
    if len(parts) >= 2 and parts[-2] == "batch":
        return "status", parts[-1]
    if parts[-1:] == ["credits"]:
        return "credits", None
    return None, None


def request_kind(method, action):
    """The kind a request is counted and fault-matched under."""
    kinds = {("POST", "create"): "create", ("GET", "status"): "status",
             ("GET", "download"): "download", ("POST", "finish"): "finish", ("DELETE", "status"): "delete"}
    return kinds.get((method, action), "other")


def parse_emails(body):
    """The list of {"email", "name"?} items of a create body, or raise ValueError saying why."""
    try:
        items = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError("body is not valid JSON: %s" % exc) from None
    if not isinstance(items, list):
        raise ValueError("body must be a JSON array of objects with an email")
    if not items:
        raise ValueError("batch is empty")
    if len(items) > MAX_BATCH_SIZE:
        raise ValueError("at most %d emails per batch, got %d" % (MAX_BATCH_SIZE, len(items)))
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("email"), str):
            raise ValueError("item %d has no string email" % index)
    return items


def distinct_items(items):
    """First spelling of each address (case-insensitive), in order, and the duplicate count."""
    seen, distinct = set(), []
    for item in items:
        key = item["email"].lower()
        if key not in seen:
            seen.add(key)
            distinct.append(item)
    return distinct, len(items) - len(distinct)


def iso_utc(epoch):
    """ISO 8601 in UTC with milliseconds and a Z, as Bouncer writes timestamps."""
    stamp = datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def is_local_callback(url):
    # Best effort only, and never a request to the outside world from a test run.
    parts = urlsplit(url)
    return parts.scheme == "http" and parts.hostname in CALLBACK_HOSTS


def post_callback(url, payload):
    request = urllib.request.Request(url, data=json.dumps(payload).encode("utf-8"), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=CALLBACK_TIMEOUT) as response:
            response.read()
    except Exception as exc:
        logger.debug("sandbox batch %s: callback failed: %s", payload["batchId"], exc)


def new_batch(items, distinct, duplicates, path, callback):
    """A batch as the simulator keeps it; `created_mono` and `completed_mono` drive its phase."""
    return {
        "batchId": uuid.uuid4().hex[:24],
        "path": path,
        "emails": [item["email"] for item in items],
        "distinct": distinct,
        "quantity": len(items),
        "duplicates": duplicates,
        "created_at": time.time(),
        "created_mono": time.monotonic(),
        "completed_at": None,
        "completed_mono": None,
        "callback": callback,
        "callback_sent": False,
        "status_override": None,
        "results_removed": False,
        "greylisted": {},        # address (lowercased) -> its retryAfter (epoch): greylisted this time
        "processed": None,       # addresses verified so far, when a test says so
        "verified": None,        # addresses verified before a finish: the download holds only these
        # Built once, on first need, and kept: a download of 10,000 records costs its encoding
        # once, however often it is asked for.
        "records": None,
        "downloads": {},
    }


def created_answer(batch):
    return {"batchId": batch["batchId"], "created": iso_utc(batch["created_at"]), "status": "queued",
            "quantity": batch["quantity"], "duplicates": batch["duplicates"]}


def only_status(records, wanted):
    if wanted == "all":
        return records
    return [record for record in records if record["status"] == wanted]


def check_fault(status, count, kind, body):
    """Refuse a fault plan a test could not have meant, saying why."""
    if count < 1:
        raise ValueError("count must be at least 1, got %r" % count)
    if kind is not None and kind not in REQUEST_KINDS:
        raise ValueError("kind must be one of %s, got %r" % (", ".join(REQUEST_KINDS), kind))
    is_status = isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599
    is_error = isinstance(status, type) and issubclass(status, BaseException)
    if not (is_status or is_error or status == "timeout"):
        raise ValueError('status must be an HTTP status, "timeout" or an exception class, got %r'
                         % (status,))
    if body is not None and not is_status:
        raise ValueError("a body goes with an HTTP status only, not with %r" % (status,))


def planned_fault(planned):
    """(fault label, reply) of a fault planned with fail_next; the reply is None for a timeout."""
    status, body = planned["status"], planned["body"]
    if status == "timeout":
        return "timeout", None
    if isinstance(status, type):
        return status.__name__, dropped_reply(status)
    if body is not None:
        reply = raw_reply(status, body)
    else:
        reply = error_reply(status, FAULT_MESSAGES.get(status, "injected fault"))
    return str(status), reply._replace(fault=str(status))


# ---------------------------------------------------------------------------------------------
# The simulator


class OptionAttribute:
    """An attribute that is one of the simulator's options. Setting it swaps in options with that
    value changed (and checked), so a test can turn a fault up mid-run (`sandbox.slow_rate = 1.0`)
    and every request after sees it."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, simulator, owner=None):
        if simulator is None:
            return self
        return getattr(simulator.options, self.name)

    def __set__(self, simulator, value):
        simulator.options = replace(simulator.options, **{self.name: value})


class Simulator:
    """Bouncer's batch API without a transport: `answer` gives the reply to one request.

    Takes SandboxOptions, or keyword arguments naming its fields, or both (the keywords win).
    """

    processing_time = OptionAttribute()
    fail_rate = OptionAttribute()
    rate_limit_rate = OptionAttribute()
    slow_rate = OptionAttribute()
    slow_seconds = OptionAttribute()
    greylist_rate = OptionAttribute()
    greylist_seconds = OptionAttribute()

    def __init__(self, options=None, **overrides):
        options = options if options is not None else SandboxOptions()
        self.options = replace(options, **overrides) if overrides else options
        # The account's balance now (None: unlimited); a test may set it at any time.
        self.credits = self.options.credits
        self.batches = {}
        self.requests = []
        self._sent = []             # the emails of every batch created, deleted ones too
        self._lock = threading.Lock()
        self._random = random.Random(self.options.seed)
        self._planned_faults = []
        self._download_hook = None
        self._counts = {"by_kind": Counter(), "by_method": Counter(), "faults": Counter()}
        self._batches_created = 0
        self._emails_received = 0
        self._greylist = {}         # address (lowercased) -> when its server accepts a try (epoch)
        self._early_retries = 0     # greylisted addresses sent again before their retryAfter
        self._timers = []
        self._closed = False
        # With a throughput, the account decides when batches complete (account.py).
        self.account = Account(self.options.throughput, self.options.parallel_batches) \
            if self.options.throughput else None
        self._ticking = False

    @property
    def start_delay(self):
        return min(self.options.processing_time * START_SHARE, MAX_START_DELAY)

    def close(self):
        """No completion callbacks from now on."""
        with self._lock:
            self._closed = True
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()

    # -- controls ------------------------------------------------------------------------------

    def fail_next(self, status, count=1, kind=None, body=None):
        """The next `count` requests (of `kind` only, if given) fail, as `status` says:

        - an HTTP status: answered with it and nothing else happens; the body is Bouncer's error
          shape unless `body` is given (bytes or str sent as is, dict or list as JSON);
        - "timeout": acted on (a create still creates its batch, as Bouncer would) but answered
          only after slow_seconds, so a client with a shorter timeout has given up; behind
          `responses` the client gets requests' ReadTimeout at once;
        - an exception class (requests' ConnectionError, ConnectTimeout, ...): the request never
          reaches Bouncer; behind `responses` it is raised, over HTTP the connection is closed
          unanswered.
        """
        check_fault(status, count, kind, body)
        with self._lock:
            self._planned_faults.append({"status": status, "count": count, "kind": kind,
                                         "body": body})

    def clear_faults(self):
        """Forget every fault planned with fail_next that has not happened yet."""
        with self._lock:
            self._planned_faults.clear()

    def complete_now(self, batch_id=None):
        """Complete one batch, or every batch, as if Bouncer had finished it."""
        with self._lock:
            targets = [self._known(batch_id)] if batch_id is not None else self.batches.values()
            for batch in list(targets):
                self._complete(batch)

    def forget(self, batch_id):
        """The batch answers 404 from now on, as if deleted on Bouncer's side."""
        with self._lock:
            self.batches.pop(batch_id, None)
        if self.account is not None:
            self.account.forget(batch_id, time.monotonic())

    def set_processed(self, batch_id, processed):
        """Bouncer has verified the batch's first `processed` addresses so far: its status stats
        say so, and a finish keeps only those (the rest refunded)."""
        with self._lock:
            self._known(batch_id)["processed"] = processed

    def set_status(self, batch_id, status):
        """Status answers for the batch say `status` (an undocumented one, or "completed" while
        its download still answers 405); None gives the batch its own status back."""
        with self._lock:
            self._known(batch_id)["status_override"] = status

    def alter_downloads(self, hook):
        """Every download from now on serves hook(records), the records Bouncer would send: to
        serve missing, extra or malformed ones. None serves them unaltered again."""
        self._download_hook = hook

    def remove_results(self, batch_id):
        """Downloads of the batch answer 405 saying its email addresses and results were removed:
        final, asking again never helps."""
        with self._lock:
            self._known(batch_id)["results_removed"] = True

    def _known(self, batch_id):
        batch = self.batches.get(batch_id)
        if batch is None:
            raise KeyError("the sandbox has no batch %r" % (batch_id,))
        return batch

    # -- readers -------------------------------------------------------------------------------

    def count(self, kind):
        """How many requests of `kind` (create, status, download, other) came, faulted included."""
        if kind not in REQUEST_KINDS:
            raise ValueError("kind must be one of %s, got %r" % (", ".join(REQUEST_KINDS), kind))
        with self._lock:
            return self._counts["by_kind"][kind]

    def sent_addresses(self):
        """Every address sent in a batch Bouncer created, as sent, in order of creation."""
        with self._lock:
            return [email for emails in self._sent for email in emails]

    def stats(self):
        with self._lock:
            return {
                "requests": len(self.requests),
                "by_kind": {kind: self._counts["by_kind"][kind] for kind in REQUEST_KINDS},
                "by_method": dict(self._counts["by_method"]),
                "faults": dict(self._counts["faults"]),
                "batches_created": self._batches_created,
                "emails_received": self._emails_received,
                "greylisted": len(self._greylist),
                "early_retries": self._early_retries,
            }

    # -- one request ---------------------------------------------------------------------------

    def answer(self, method, path, query, api_key, body, wait=time.sleep, arrived=None):
        """The reply to one request: its method, path, query ({name: [values]}), x-api-key and
        body (bytes). A delayed fault is waited out with `wait` before Bouncer acts, so a slow
        create's batch exists only once its answer is due. The request is recorded (arriving at
        `arrived`, default now) before the reply is returned, so a client that got its answer
        finds it in `requests`."""
        arrived = time.time() if arrived is None else arrived
        action, batch_id = parse_route(path)
        request = Request(method, path, query, api_key, body, action, batch_id,
                          request_kind(method, action))
        try:
            reply = self._reply(request, wait)
        except Exception:
            logger.exception("sandbox: %s %s failed", method, path)
            reply = error_reply(500, "sandbox error")
        self._record_request(arrived, request, reply)
        return reply

    def _reply(self, request, wait):
        if not self._authorized(request.api_key):
            return error_reply(401, "Invalid API key")
        fault, reply = self._draw_fault(request.kind)
        if reply is not None:
            return reply
        if fault in DELAYED_FAULTS:
            wait(self.options.slow_seconds)
        return self._route(request)._replace(fault=fault)

    def _record_request(self, arrived, request, reply):
        """Keep the request in memory and, if asked, as one JSON line for other processes."""
        entry = {"time": arrived, "kind": request.kind, "method": request.method,
                 "path": request.path, "status": reply.status, "fault": reply.fault}
        if request.kind == "create" and reply.status == 200:
            # The batch made and the credits it costs: a soak tells orphans from followed batches.
            created = json.loads(reply.body)
            entry.update(batch_id=created["batchId"], credits=created["quantity"] - created["duplicates"])
        with self._lock:
            self.requests.append(entry)
            self._counts["by_kind"][request.kind] += 1
            self._counts["by_method"][request.method] += 1
            if reply.fault is not None:
                self._counts["faults"][reply.fault] += 1
            if self.options.request_log:
                self._append_to_request_log(entry)

    def _append_to_request_log(self, entry):
        # A broken log file must not stop the sandbox from answering.
        try:
            with open(self.options.request_log, "a", encoding="utf-8") as log:
                log.write(json.dumps(entry) + "\n")
        except OSError as exc:
            logger.warning("sandbox: cannot append to request log %s: %s",
                           self.options.request_log, exc)

    def _authorized(self, api_key):
        if not api_key:
            return False
        if self.options.api_key is None:
            return True
        return hmac.compare_digest(api_key.encode("utf-8"), self.options.api_key.encode("utf-8"))

    def _draw_fault(self, kind):
        """(fault, reply): a planned fault first, else the seeded random ones. The reply is None
        when the request is to be answered, late or not."""
        with self._lock:
            planned = self._take_planned_fault(kind)
            # Always draw the same number of values, so a seed replays the same faults.
            draws = [self._random.random() for _ in range(4)]
        if planned is not None:
            return planned_fault(planned)
        return self._random_fault(draws)

    def _random_fault(self, draws):
        options = self.options
        if draws[0] < options.fail_rate:
            status = 503 if draws[3] < 0.5 else 500
            return str(status), error_reply(status, "injected fault")._replace(fault=str(status))
        if draws[1] < options.rate_limit_rate:
            return "429", error_reply(429, FAULT_MESSAGES[429])._replace(fault="429")
        if draws[2] < options.slow_rate:
            return "slow", None
        return None, None

    def _take_planned_fault(self, kind):
        for planned in self._planned_faults:
            if planned["kind"] in (None, kind):
                planned["count"] -= 1
                if planned["count"] == 0:
                    self._planned_faults.remove(planned)
                return planned
        return None

    def _route(self, request):
        method, action = request.method, request.action
        if (method, action) == ("POST", "create"):
            return self._create(request)
        if (method, action) == ("GET", "credits"):
            return self._credits()
        handlers = {("GET", "status"): self._status, ("DELETE", "status"): self._delete,
                    ("GET", "download"): self._download, ("POST", "finish"): self._finish}
        handler = handlers.get((method, action))
        if handler is None:
            return error_reply(404, "no route for %s %s" % (method, request.path))
        with self._lock:
            batch = self.batches.get(request.batch_id)
        if batch is None:
            return error_reply(404, "request %s does not exist" % request.batch_id)
        return handler(batch, request.query)

    # -- endpoints -----------------------------------------------------------------------------

    def _create(self, request):
        try:
            items = parse_emails(request.body)
        except ValueError as exc:
            return error_reply(400, str(exc))
        distinct, duplicates = distinct_items(items)
        batch = new_batch(items, distinct, duplicates, request.path,
                          self._callback_from(request.query))
        with self._lock:
            refused = self._spend_credits(len(distinct))
            if refused is not None:
                return refused
            batch["greylisted"] = self._greylist_of(distinct, batch["created_at"])
            self._store(batch)
        logger.debug("sandbox batch %s created: %d emails, %d duplicates",
                     batch["batchId"], batch["quantity"], duplicates)
        return json_reply(200, created_answer(batch))

    def _credits(self):
        with self._lock:
            balance = UNLIMITED_CREDITS if self.credits is None else self.credits
        return json_reply(200, {"credits": balance})

    def _status(self, batch, query):
        now = time.monotonic()
        phase = self._phase(batch, now)
        answer = {"batchId": batch["batchId"], "created": iso_utc(batch["created_at"]),
                  "status": batch["status_override"] or phase, "quantity": batch["quantity"],
                  "duplicates": batch["duplicates"]}
        if phase != "queued":
            answer["started"] = iso_utc(self._started_at(batch))
        if phase == "completed":
            answer["completed"] = iso_utc(self._completed_at(batch))
            answer["credits"] = len(self._records(batch))
        if query.get("with-stats", [""])[0].lower() in ("true", "1"):
            answer.update(self._progress(batch, phase, now))
        return json_reply(200, answer)

    def _download(self, batch, query):
        if batch["results_removed"]:
            return error_reply(405, RESULTS_REMOVED)
        if self._phase(batch, time.monotonic()) != "completed":
            return error_reply(405, NOT_COMPLETED)
        wanted = query.get("download", ["all"])[0]
        if wanted not in DOWNLOAD_FILTERS:
            return error_reply(400, "download must be one of %s" % ", ".join(DOWNLOAD_FILTERS))
        hook = self._download_hook
        if hook is not None:
            # Built afresh each time, on a copy: the hook may change, or change what it is given.
            return json_reply(200, hook(copy.deepcopy(only_status(self._records(batch), wanted))))
        cached = batch["downloads"].get(wanted)
        if cached is None:
            cached = json_reply(200, only_status(self._records(batch), wanted))
            batch["downloads"][wanted] = cached
        return cached

    def _delete(self, batch, query):
        with self._lock:
            if self._phase(batch, time.monotonic()) != "completed":
                return error_reply(405, NOT_DELETABLE)
            self.batches.pop(batch["batchId"], None)
        if self.account is not None:
            self.account.forget(batch["batchId"], time.monotonic())
        logger.debug("sandbox batch %s deleted", batch["batchId"])
        return json_reply(200, {})

    def _finish(self, batch, query):
        """Stop the batch: what it verified so far is its download, the rest is refunded."""
        with self._lock:
            now = time.monotonic()
            if self._phase(batch, now) == "completed":
                return error_reply(400, NOT_RUNNING)
            verified = self._processed(batch, self._phase(batch, now), now)
            batch["verified"] = verified
            if self.credits is not None:
                self.credits += len(batch["distinct"]) - verified
            self._complete(batch)
        return json_reply(202, {})

    # -- batch state ---------------------------------------------------------------------------

    def _spend_credits(self, needed):
        """None when the balance covers `needed` (then spent), else Bouncer's 402. Lock held."""
        if self.credits is None:
            return None
        if needed > self.credits:
            return error_reply(402, "%d credits left" % self.credits)
        self.credits -= needed
        return None

    def _store(self, batch):
        """Keep a new batch and follow it to its callback. Lock held."""
        self.batches[batch["batchId"]] = batch
        self._sent.append(batch["emails"])
        self._batches_created += 1
        self._emails_received += batch["quantity"]
        if self.account is not None:
            self.account.add(batch["batchId"], len(batch["distinct"]), batch["created_mono"])
            if batch["callback"]:
                self._keep_ticking()
        elif batch["callback"]:
            self._schedule_callback(batch["batchId"], self.options.processing_time)

    def _records(self, batch):
        """The batch's download records: one per distinct address as sent or, after a finish,
        per address it had verified."""
        return self._all_records(batch)[:batch["verified"]]

    def _all_records(self, batch):
        """A record for each distinct address of the batch, built once."""
        if batch["records"] is None:
            greylisted = batch["greylisted"]
            batch["records"] = [build_record(item, greylisted.get(item["email"].strip().lower()))
                                for item in batch["distinct"]]
        return batch["records"]

    def _greylist_of(self, items, now):
        """{address: its retryAfter} of the addresses greylisted this time: on a first try, and
        on a try before the retryAfter the first one gave (counted as an early retry). Lock held."""
        found = {}
        for item in items:
            if not is_greylisted(item["email"], self.options.greylist_rate):
                continue
            address = item["email"].strip().lower()
            retry_at = self._greylist.get(address)
            if retry_at is None:
                retry_at = self._greylist[address] = now + self.options.greylist_seconds
            elif now >= retry_at:
                continue    # tried again late enough: the server accepts it
            else:
                self._early_retries += 1
            found[address] = retry_at
        return found

    def _phase(self, batch, now):
        if self.account is not None:
            return self.account.state(batch["batchId"], now)[0]
        elapsed = now - batch["created_mono"]
        if batch["completed_mono"] is not None or elapsed >= self.options.processing_time:
            return "completed"
        return "processing" if elapsed >= self.start_delay else "queued"

    def _started_at(self, batch):
        if self.account is not None:
            return self._epoch(batch, self.account.state(batch["batchId"], time.monotonic())[1])
        started = batch["created_at"] + self.start_delay
        return min(started, self._completed_at(batch))

    def _completed_at(self, batch):
        if self.account is not None:
            return self._epoch(batch, self.account.state(batch["batchId"], time.monotonic())[2])
        if batch["completed_at"] is not None:
            return batch["completed_at"]
        return batch["created_at"] + self.options.processing_time

    @staticmethod
    def _epoch(batch, moment):
        """A monotonic moment of the batch's life as Unix time."""
        return None if moment is None else batch["created_at"] + (moment - batch["created_mono"])

    def _progress(self, batch, phase, now):
        """`processed` and per-status `stats` over the addresses verified so far."""
        if phase == "completed":
            processed = len(self._records(batch))
        else:
            processed = self._processed(batch, phase, now)
        counts = Counter(record["status"] for record in self._all_records(batch)[:processed])
        stats = {status: counts[status] for status in DOWNLOAD_FILTERS[1:]}
        return {"processed": processed, "stats": stats}

    def _processed(self, batch, phase, now):
        """How many of a running batch's addresses are verified by now."""
        total = len(batch["distinct"])
        if batch["processed"] is not None:
            return min(batch["processed"], total)
        if phase == "queued":
            return 0
        if self.account is not None:   # at the account's pace, shared with the batches beside it
            return int(total - self.account.state(batch["batchId"], now)[3])
        share = (now - batch["created_mono"] - self.start_delay) / (
            self.options.processing_time - self.start_delay)
        return int(total * min(max(share, 0.0), 1.0))

    def _complete(self, batch):
        """Complete the batch now, if it is not yet. Lock held."""
        if self._phase(batch, time.monotonic()) == "completed":
            return
        batch["completed_at"] = time.time()
        batch["completed_mono"] = time.monotonic()
        if self.account is not None:
            self.account.complete(batch["batchId"], batch["completed_mono"])
        logger.debug("sandbox batch %s completed early", batch["batchId"])
        if batch["callback"]:
            self._schedule_callback(batch["batchId"], 0)

    # -- callbacks -----------------------------------------------------------------------------

    def _callback_from(self, query):
        url = query.get("callback", [""])[0]
        if url and not is_local_callback(url):
            logger.debug("sandbox ignores non-local callback URL")
            return None
        return url or None

    def _schedule_callback(self, batch_id, delay):
        """Post the batch's callback after `delay` seconds. Lock held."""
        if self._closed:
            return
        timer = threading.Timer(delay, self._send_callback, args=(batch_id,))
        timer.daemon = True
        self._timers = [t for t in self._timers if t.is_alive()] + [timer]
        timer.start()

    def _keep_ticking(self):
        """With a throughput: look for completed batches every CALLBACK_TICK, and post their
        callbacks, while any batch with one is not yet done. Lock held."""
        if self._ticking or self._closed:
            return
        self._ticking = True
        timer = threading.Timer(CALLBACK_TICK, self._tick)
        timer.daemon = True
        self._timers = [t for t in self._timers if t.is_alive()] + [timer]
        timer.start()

    def _tick(self):
        now = time.monotonic()
        with self._lock:
            self._ticking = False
            waiting = [b["batchId"] for b in self.batches.values() if b["callback"] and not b["callback_sent"]]
        done = [b for b in waiting if self.account.state(b, now)[0] == "completed"]
        for batch_id in done:
            self._send_callback(batch_id)
        if len(done) < len(waiting):
            with self._lock:
                self._keep_ticking()

    def _send_callback(self, batch_id):
        with self._lock:
            batch = self.batches.get(batch_id)
            if batch is None or batch["callback_sent"] or self._closed:
                return
            now = time.monotonic()
            if self._phase(batch, now) != "completed":
                if self.account is not None:
                    return          # the ticker comes back for it
                # The timer woke a hair early: try again when the batch is really done.
                remaining = batch["created_mono"] + self.options.processing_time - now
                self._schedule_callback(batch_id, max(remaining, 0.01))
                return
            batch["callback_sent"] = True
            url = batch["callback"]
        logger.debug("sandbox batch %s: posting completion callback", batch_id)
        post_callback(url, {"batchId": batch_id, "status": "completed"})
