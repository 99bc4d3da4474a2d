"""A local simulator of Bouncer's batch API, so the service runs with no account and no network.

It speaks the documented create / status / download / delete / finish lifecycle (see
bouncer-api.md), answers Bouncer's sandbox addresses the way Bouncer does, gives every other
address a verdict derived from a hash of it (the same address always gets the same verdict), and
can inject faults (5xx, 429, slow answers) either at random with a seed or on demand from a test.

Standard library only: one ThreadingHTTPServer, one lock around the batches.
"""
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
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger("bouncer.sandbox")

MAX_BATCH_SIZE = 100_000
CREDITS = 1_000_000
SANDBOX_DOMAIN = "sandbox.usebouncer.com"
REQUEST_KINDS = ("create", "status", "download", "other")
DOWNLOAD_FILTERS = ("all", "deliverable", "risky", "undeliverable", "unknown")
CALLBACK_HOSTS = ("127.0.0.1", "localhost")
CALLBACK_TIMEOUT = 2.0
# A batch leaves "queued" after this share of its processing time, capped so long runs still move.
START_SHARE = 0.25
MAX_START_DELAY = 5.0

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

Reply = namedtuple("Reply", "status body content_type")


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


def build_record(item):
    """One download record, shaped like Bouncer's, for an item as it was sent."""
    email = item["email"]
    found = verdict_for(email)
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
        "retryAfter": None,
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
             ("GET", "download"): "download"}
    return kinds.get((method, action), "other")


def parse_emails(body):
    """The list of {"email", "name"?} items of a create body, or raise ValueError saying why."""
    try:
        items = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError("body is not valid JSON: %s" % exc)
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


# ---------------------------------------------------------------------------------------------
# The simulator


class Sandbox:
    """Bouncer's batch API on a local port; start() serves it from a daemon thread."""

    def __init__(self, host="127.0.0.1", port=0, processing_time=2.0, api_key=None,
                 fail_rate=0.0, rate_limit_rate=0.0, slow_rate=0.0, slow_seconds=5.0,
                 seed=0, request_log=None):
        self.host = host
        self.port = port
        self.processing_time = processing_time
        self.start_delay = min(processing_time * START_SHARE, MAX_START_DELAY)
        self.api_key = api_key
        self.fail_rate = fail_rate
        self.rate_limit_rate = rate_limit_rate
        self.slow_rate = slow_rate
        self.slow_seconds = slow_seconds
        self.request_log = request_log
        self.batches = {}
        self.requests = []
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._planned_faults = []
        self._counts = {"by_kind": Counter(), "by_method": Counter(), "faults": Counter()}
        self._batches_created = 0
        self._emails_received = 0
        self._timers = []
        self._server = None
        self._thread = None
        self._serving = threading.Event()

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self):
        return "http://%s:%d" % (self.host, self.port)

    def start(self):
        self._bind()
        self._thread = threading.Thread(target=self.serve_forever, name="bouncer-sandbox",
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self):
        server = self._bind()
        logger.debug("sandbox serving on %s", self.url)
        self._serving.set()
        try:
            # A short poll keeps stop() quick: shutdown waits for the loop's next wake-up.
            server.serve_forever(poll_interval=0.05)
        finally:
            self._serving.clear()

    def stop(self):
        server, self._server = self._server, None
        if server is None:
            return
        if self._serving.is_set():
            server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        server.server_close()
        self._cancel_timers()
        logger.debug("sandbox on %s stopped", self.url)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def _bind(self):
        if self._server is None:
            self._server = _Server((self.host, self.port), self)
            self.port = self._server.server_address[1]
        return self._server

    def _cancel_timers(self):
        with self._lock:
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()

    # -- test helpers --------------------------------------------------------------------------

    def fail_next(self, status, count=1, kind=None, body=None):
        """The next `count` requests (of `kind` only, if given) answer `status`.

        The body is Bouncer's error shape unless `body` is given (bytes/str raw, dict/list JSON).
        """
        if count < 1:
            raise ValueError("count must be at least 1, got %r" % count)
        if kind is not None and kind not in REQUEST_KINDS:
            raise ValueError("kind must be one of %s, got %r" % (", ".join(REQUEST_KINDS), kind))
        with self._lock:
            self._planned_faults.append({"status": status, "count": count, "kind": kind,
                                         "body": body})

    def complete_now(self, batch_id=None):
        """Complete one batch, or every batch, as if Bouncer had finished it."""
        with self._lock:
            targets = [batch_id] if batch_id is not None else list(self.batches)
            for target in targets:
                batch = self.batches.get(target)
                if batch is not None:
                    self._complete(batch)

    def forget(self, batch_id):
        """The batch now answers 404, as if deleted on Bouncer's side."""
        with self._lock:
            self.batches.pop(batch_id, None)

    def stats(self):
        with self._lock:
            return {
                "requests": len(self.requests),
                "by_kind": {kind: self._counts["by_kind"][kind] for kind in REQUEST_KINDS},
                "by_method": dict(self._counts["by_method"]),
                "faults": dict(self._counts["faults"]),
                "batches_created": self._batches_created,
                "emails_received": self._emails_received,
            }

    # -- one request ---------------------------------------------------------------------------

    def _answer(self, method, path, query, api_key, body):
        """The reply to one request and the fault injected into it (None, "slow" or a status)."""
        action, batch_id = parse_route(path)
        if not self._authorized(api_key):
            return error_reply(401, "Invalid API key"), None
        fault, reply = self._draw_fault(request_kind(method, action))
        if reply is not None:
            return reply, fault
        if fault == "slow":
            time.sleep(self.slow_seconds)
        return self._route(method, action, batch_id, query, body, path), fault

    def _record_request(self, started, method, path, status, fault):
        """Keep the request in memory and, if asked, as one JSON line for other processes."""
        entry = {"time": started, "method": method, "path": path, "status": status,
                 "fault": fault}
        with self._lock:
            self.requests.append(entry)
            self._counts["by_kind"][request_kind(method, parse_route(path)[0])] += 1
            self._counts["by_method"][method] += 1
            if fault is not None:
                self._counts["faults"][fault] += 1
            if self.request_log:
                self._append_to_request_log(entry)

    def _append_to_request_log(self, entry):
        # A broken log file must not stop the sandbox from answering.
        try:
            with open(self.request_log, "a", encoding="utf-8") as log:
                log.write(json.dumps(entry) + "\n")
        except OSError as exc:
            logger.warning("sandbox: cannot append to request log %s: %s", self.request_log, exc)

    def _authorized(self, api_key):
        if not api_key:
            return False
        if self.api_key is None:
            return True
        return hmac.compare_digest(api_key.encode("utf-8"), self.api_key.encode("utf-8"))

    def _draw_fault(self, kind):
        """(fault, reply): a planned fault first, else the seeded random ones."""
        with self._lock:
            planned = self._take_planned_fault(kind)
            # Always draw the same number of values, so a seed replays the same faults.
            draws = [self._random.random() for _ in range(4)]
        if planned is not None:
            status, body = planned["status"], planned["body"]
            if body is not None:
                return str(status), raw_reply(status, body)
            return str(status), error_reply(status, FAULT_MESSAGES.get(status, "injected fault"))
        if draws[0] < self.fail_rate:
            status = 503 if draws[3] < 0.5 else 500
            return str(status), error_reply(status, "injected fault")
        if draws[1] < self.rate_limit_rate:
            return "429", error_reply(429, FAULT_MESSAGES[429])
        if draws[2] < self.slow_rate:
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

    def _route(self, method, action, batch_id, query, body, path):
        if (method, action) == ("POST", "create"):
            return self._create(body, query, path)
        if (method, action) == ("GET", "credits"):
            return json_reply(200, {"credits": CREDITS})
        handlers = {("GET", "status"): self._status, ("DELETE", "status"): self._delete,
                    ("GET", "download"): self._download, ("POST", "finish"): self._finish}
        handler = handlers.get((method, action))
        if handler is None:
            return error_reply(404, "no route for %s %s" % (method, path))
        with self._lock:
            batch = self.batches.get(batch_id)
            if batch is None:
                return error_reply(404, "request %s does not exist" % batch_id)
            return handler(batch, query)

    # -- batch endpoints -----------------------------------------------------------------------

    def _create(self, body, query, path):
        try:
            items = parse_emails(body)
        except ValueError as exc:
            return error_reply(400, str(exc))
        distinct, duplicates = distinct_items(items)
        batch = {
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
            "callback": self._callback_from(query),
            "callback_sent": False,
        }
        with self._lock:
            self.batches[batch["batchId"]] = batch
            self._batches_created += 1
            self._emails_received += len(items)
            if batch["callback"]:
                self._schedule_callback(batch["batchId"], self.processing_time)
        logger.debug("sandbox batch %s created: %d emails, %d duplicates",
                     batch["batchId"], batch["quantity"], duplicates)
        return json_reply(200, {"batchId": batch["batchId"],
                                "created": iso_utc(batch["created_at"]), "status": "queued",
                                "quantity": batch["quantity"], "duplicates": duplicates})

    def _status(self, batch, query):
        now = time.monotonic()
        phase = self._phase(batch, now)
        answer = {"batchId": batch["batchId"], "created": iso_utc(batch["created_at"]),
                  "status": phase, "quantity": batch["quantity"],
                  "duplicates": batch["duplicates"]}
        if phase != "queued":
            answer["started"] = iso_utc(self._started_at(batch))
        if phase == "completed":
            answer["completed"] = iso_utc(self._completed_at(batch))
            answer["credits"] = batch["quantity"] - batch["duplicates"]
        if query.get("with-stats", [""])[0].lower() in ("true", "1"):
            answer.update(self._progress(batch, phase, now))
        return json_reply(200, answer)

    def _download(self, batch, query):
        if self._phase(batch, time.monotonic()) != "completed":
            return error_reply(405, "batch is not completed")
        wanted = query.get("download", ["all"])[0]
        if wanted not in DOWNLOAD_FILTERS:
            return error_reply(400, "download must be one of %s" % ", ".join(DOWNLOAD_FILTERS))
        records = [build_record(item) for item in batch["distinct"]]
        if wanted != "all":
            records = [record for record in records if record["status"] == wanted]
        return json_reply(200, records)

    def _delete(self, batch, query):
        del self.batches[batch["batchId"]]
        logger.debug("sandbox batch %s deleted", batch["batchId"])
        return json_reply(200, {})

    def _finish(self, batch, query):
        if self._phase(batch, time.monotonic()) == "completed":
            return error_reply(400, "batch has to be running to finish")
        self._complete(batch)
        return json_reply(202, {})

    # -- batch state (callers hold the lock) ---------------------------------------------------

    def _phase(self, batch, now):
        elapsed = now - batch["created_mono"]
        if batch["completed_mono"] is not None or elapsed >= self.processing_time:
            return "completed"
        return "processing" if elapsed >= self.start_delay else "queued"

    def _started_at(self, batch):
        started = batch["created_at"] + self.start_delay
        return min(started, self._completed_at(batch))

    def _completed_at(self, batch):
        if batch["completed_at"] is not None:
            return batch["completed_at"]
        return batch["created_at"] + self.processing_time

    def _progress(self, batch, phase, now):
        """`processed` and per-status `stats` over the addresses verified so far."""
        distinct = batch["distinct"]
        if phase == "completed":
            processed = len(distinct)
        elif phase == "queued":
            processed = 0
        else:
            share = (now - batch["created_mono"] - self.start_delay) / (
                self.processing_time - self.start_delay)
            processed = int(len(distinct) * min(max(share, 0.0), 1.0))
        counts = Counter(verdict_for(item["email"])["status"] for item in distinct[:processed])
        stats = {status: counts[status] for status in DOWNLOAD_FILTERS[1:]}
        return {"processed": processed, "stats": stats}

    def _complete(self, batch):
        if self._phase(batch, time.monotonic()) == "completed":
            return
        batch["completed_at"] = time.time()
        batch["completed_mono"] = time.monotonic()
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
        timer = threading.Timer(delay, self._send_callback, args=(batch_id,))
        timer.daemon = True
        self._timers = [t for t in self._timers if t.is_alive()] + [timer]
        timer.start()

    def _send_callback(self, batch_id):
        with self._lock:
            batch = self.batches.get(batch_id)
            if batch is None or batch["callback_sent"] or self._server is None:
                return
            now = time.monotonic()
            if self._phase(batch, now) != "completed":
                # The timer woke a hair early: try again when the batch is really done.
                remaining = batch["created_mono"] + self.processing_time - now
                self._schedule_callback(batch_id, max(remaining, 0.01))
                return
            batch["callback_sent"] = True
            url = batch["callback"]
        logger.debug("sandbox batch %s: posting completion callback", batch_id)
        post_callback(url, {"batchId": batch_id, "status": "completed"})


# ---------------------------------------------------------------------------------------------
# HTTP plumbing


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, sandbox):
        self.sandbox = sandbox
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address):
        # A client that hangs up mid-request is normal under fault injection; stay quiet.
        logger.debug("sandbox: error serving %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server_version = "BouncerSandbox/1.0"

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_DELETE(self):
        self._serve("DELETE")

    def do_PUT(self):
        self._serve("PUT")

    def do_PATCH(self):
        self._serve("PATCH")

    def log_message(self, format, *args):
        logger.debug("sandbox %s: " + format, self.address_string(), *args)

    def _serve(self, method):
        started = time.time()
        parts = urlsplit(self.path)
        sandbox = self.server.sandbox
        fault = None
        try:
            # Read the whole body first, even for a faulted answer: closing on unread data
            # makes the kernel reset the connection and the client would never see the answer.
            body = self._read_body()
            reply, fault = sandbox._answer(method, parts.path, parse_qs(parts.query),
                                          self.headers.get("x-api-key"), body)
        except Exception:
            logger.exception("sandbox: %s %s failed", method, parts.path)
            reply = error_reply(500, "sandbox error")
        # Recorded before answering, so a client that got its answer finds the request logged.
        sandbox._record_request(started, method, parts.path, reply.status, fault)
        self._write(reply)

    def _read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _write(self, reply):
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("sandbox: client went away before the answer")


def main(port, processing_time, api_key=None, host="127.0.0.1", fail_rate=0.0,
         rate_limit_rate=0.0, slow_rate=0.0, slow_seconds=5.0, seed=0, request_log=None):
    """Serve the sandbox in the foreground until interrupted."""
    sandbox = Sandbox(host=host, port=port, processing_time=processing_time, api_key=api_key,
                      fail_rate=fail_rate, rate_limit_rate=rate_limit_rate, slow_rate=slow_rate,
                      slow_seconds=slow_seconds, seed=seed, request_log=request_log)
    sandbox._bind()
    logger.info("Bouncer sandbox listening on %s (batches complete after %ss)",
                sandbox.url, processing_time)
    try:
        sandbox.serve_forever()
    except KeyboardInterrupt:
        logger.info("Bouncer sandbox on %s stopped", sandbox.url)
    finally:
        sandbox.stop()
