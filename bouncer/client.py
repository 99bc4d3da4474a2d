"""Client for Bouncer's batch verification API: create a batch, check its status, download its results,
finish it (stop it, refunding what it had not verified) and delete it.

Every failed call, whatever the cause, leaves this module as one BouncerError with a one-line
message that says what went wrong and never carries the API key.
"""
import http
import http.client
import json
import logging
import re
import time
from urllib.parse import quote, urlsplit, urlunsplit

import requests
import urllib3

from bouncer.config import MAX_BATCH_EMAILS
from bouncer.errors import BouncerError
from bouncer.masking import mask_secrets
from bouncer.names import CHECK_TYPES, USER_AGENT

log = logging.getLogger(__name__)

DEFAULT_BATCH_PATH = "/v1.1/email/verify/batch"
CREDITS_PATH = "/v1.1/credits"
# How much of an unexpected answer goes into a message: enough to recognise it, not a page of HTML.
SNIPPET_CHARS = 200
# Only the start of a large body is looked at when building a snippet.
SNIPPET_SOURCE_BYTES = 8192

HINTS = {
    401: "check BOUNCER_API_KEY",
    402: "out of Bouncer credits: buy more credits",
    429: "rate limited by Bouncer",
}


class BouncerClient:
    """Calls Bouncer's batch endpoints for both check types through one requests.Session."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float = 20,
                 catchall_path: str = DEFAULT_BATCH_PATH, session: requests.Session | None = None,
                 connect_timeout: float = 5):
        self.base_url = base_url.rstrip("/")
        # A connect timeout means the request never left: safe to send again. A read timeout
        # means Bouncer may have acted on it (a create: a possible orphan), so the read
        # timeout is sized to Bouncer's real answer times, the connect one much shorter.
        self.timeout = timeout
        self.connect_timeout = min(connect_timeout, timeout)
        self.catchall_path = normalize_path(catchall_path)
        self.session = session if session is not None else requests.Session()
        self._api_key = api_key

    def __repr__(self):
        # The key must never reach a log line through a repr.
        return "BouncerClient(base_url=%r, api_key=%s, timeout=%r, catchall_path=%r)" % (
            self.base_url, "set" if self._api_key else "unset", self.timeout, self.catchall_path)

    def use_own_connections(self):
        """In a forked process: a session of its own, so that no pooled connection of the
        parent's is ever shared."""
        self.session = requests.Session()

    def batch_path(self, check_type: str) -> str:
        if check_type == "deliverable":
            return DEFAULT_BATCH_PATH
        if check_type == "catchall":
            return self.catchall_path
        raise ValueError("unknown check type %r; expected one of %s" % (check_type, ", ".join(CHECK_TYPES)))

    def create_batch(self, check_type: str, emails: list[str], callback_url: str | None = None) -> dict:
        path = self.batch_path(check_type)
        emails = list(emails)
        check_emails(emails)
        # A JSON encoder, never concatenation: a stray backslash or quote would break the body.
        body = json.dumps([{"email": email} for email in emails]).encode("utf-8")
        params = {"callback": callback_url} if callback_url else None
        status, answer, response = self._call("create", "POST", path, params=params, data=body)
        batch_id = answer.get("batchId") if isinstance(answer, dict) else None
        if not isinstance(batch_id, str) or not batch_id.strip():
            raise self._error("create", status, "Bouncer create failed: HTTP %d answer had no batchId: %s"
                              % (status, self._snippet(response.content) or "(empty)"))
        log.debug("Bouncer created %s batch %s with %d emails", check_type, batch_id, len(emails))
        return answer

    def get_batch(self, check_type: str, batch_id: str) -> dict:
        path = "%s/%s" % (self.batch_path(check_type), quote_batch_id(batch_id))
        status, answer, response = self._call("status", "GET", path, params={"with-stats": "true"})
        if not isinstance(answer, dict) or not isinstance(answer.get("status"), str):
            raise self._error("status", status, "Bouncer status failed: HTTP %d answer had no batch status: %s"
                              % (status, self._snippet(response.content) or "(empty)"))
        return answer

    def download_batch(self, check_type: str, batch_id: str) -> list[dict]:
        path = "%s/%s/download" % (self.batch_path(check_type), quote_batch_id(batch_id))
        status, answer, response = self._call("download", "GET", path, params={"download": "all"},
                                              parse=parse_records)
        if not isinstance(answer, list):
            raise self._error("download", status, "Bouncer download failed: HTTP %d answer is not a list of "
                              "records: %s" % (status, self._snippet(response.content) or "(empty)"))
        records = [item for item in answer if isinstance(item, dict)]
        if len(records) < len(answer):
            # Interpreting odd items is not the client's job; dropping them keeps the rest usable.
            log.warning("Bouncer download of %s batch %s: left out %d items that are not JSON objects",
                        check_type, batch_id, len(answer) - len(records))
        return records

    def finish_batch(self, check_type: str, batch_id: str) -> None:
        """Ask Bouncer to stop the batch and refund what it has not verified (202). Bouncer
        refuses a batch that is not running with a 400, which it may also carry in a 200's body."""
        path = "%s/%s/finish" % (self.batch_path(check_type), quote_batch_id(batch_id))
        self._call("finish", "POST", path, parse=parse_optional_json)
        log.info("Bouncer is finishing %s batch %s", check_type, batch_id)

    def delete_batch(self, check_type: str, batch_id: str) -> bool:
        """Delete the batch's addresses and results at Bouncer: True when deleted now, False when
        Bouncer no longer knew it (404: gone already, which is what was asked). A batch still
        running is refused with a 405, raised like any other failure."""
        path = "%s/%s" % (self.batch_path(check_type), quote_batch_id(batch_id))
        try:
            self._call("delete", "DELETE", path, parse=parse_optional_json)
        except BouncerError as exc:
            if exc.is_not_found:
                return False
            raise
        log.info("Bouncer deleted %s batch %s", check_type, batch_id)
        return True

    def get_credits(self) -> int:
        """The account's balance (GET /v1.1/credits; Bouncer allows 10 a minute)."""
        status, answer, response = self._call("credits", "GET", CREDITS_PATH)
        credits = answer.get("credits") if isinstance(answer, dict) else None
        if isinstance(credits, bool) or not isinstance(credits, (int, float)):
            raise self._error("credits", status, "Bouncer credits failed: HTTP %d answer had no credits: %s"
                              % (status, self._snippet(response.content) or "(empty)"))
        return int(credits)

    def _call(self, operation, method, path, params=None, data=None, parse=json.loads):
        """(HTTP status, parsed JSON body, response) of a 2xx answer; BouncerError for anything else."""
        # The query is left out of the log: a callback URL may carry a secret.
        log.debug("Bouncer %s: %s %s", operation, method, path)
        started = time.monotonic()
        try:
            response = self.session.request(
                method, self.base_url + path, params=params, data=data,
                headers=self._headers(has_body=data is not None),
                timeout=(self.connect_timeout, self.timeout),
                # A redirect would forward the key header to wherever it points, even another host.
                allow_redirects=False)
        except (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
                OSError, ValueError) as exc:
            # `from None`: the original exception's text could hold what this message scrubs.
            raise self._transport_error(operation, exc) from None
        log.debug("Bouncer %s answered HTTP %d in %.2fs", operation, response.status_code,
                  time.monotonic() - started)
        if not 200 <= response.status_code < 300:
            raise self._http_error(operation, response)
        try:
            answer = parse(response.content)
        except (ValueError, UnicodeDecodeError):
            snippet = self._snippet(response.content)
            raise self._error(operation, response.status_code,
                              "Bouncer %s failed: HTTP %d answered with a body that is not JSON%s"
                              % (operation, response.status_code, ": " + snippet if snippet else " (empty)")
                              ) from None
        embedded = embedded_error_status(answer)
        if embedded is not None:
            # Bouncer documents error bodies inside 200 answers; trusting them beats a bogus result.
            raise self._error(operation, embedded, "Bouncer %s failed: HTTP %d %s (carried in an HTTP %d answer)"
                              % (operation, embedded, self._error_detail(answer, standard_phrase(embedded)),
                                 response.status_code) + hint_for(embedded))
        return response.status_code, answer, response

    def _headers(self, has_body):
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if has_body:
            headers["Content-Type"] = "application/json"
        if self._api_key:
            headers["x-api-key"] = self._api_key
        return headers

    def _transport_error(self, operation, exc):
        if isinstance(exc, requests.ConnectTimeout):
            return self._error(operation, None, "Bouncer %s failed: cannot connect to %s within %s"
                               % (operation, self.base_url, format_seconds(self.connect_timeout)))
        if is_timeout(exc):
            error = self._error(operation, None, "Bouncer %s call timed out after %s"
                                % (operation, format_seconds(self.timeout)))
            error.timed_out = True
            return error
        if isinstance(exc, requests.ConnectionError):
            return self._error(operation, None, "Bouncer %s failed: cannot connect to %s: %s"
                               % (operation, self.base_url, self._short_reason(exc)))
        return self._error(operation, None, "Bouncer %s failed: %s: %s"
                           % (operation, type(exc).__name__, self._short_reason(exc)))

    def _http_error(self, operation, response):
        code = response.status_code
        reason = response.reason or standard_phrase(code)
        if 300 <= code < 400:
            detail = "%s: redirected to %s; redirects are not followed (check BOUNCER_API_URL)" % (
                reason, without_query(response.headers.get("Location", "")) or "(no location)")
        else:
            try:
                body = json.loads(response.content)
            except (ValueError, UnicodeDecodeError):
                body = None
            if isinstance(body, dict):
                detail = self._error_detail(body, reason)
            else:
                snippet = self._snippet(response.content)
                detail = "%s: %s" % (reason, snippet) if snippet else reason
        return self._error(operation, code, ("Bouncer %s failed: HTTP %d %s" % (operation, code, detail)).rstrip()
                           + hint_for(code))

    def _error_detail(self, body, fallback_error):
        """'<error>: <message>' from Bouncer's error body, each part lenient about type and presence."""
        error = self._clip(body.get("error")) or fallback_error
        message = self._clip(body.get("message"))
        if not message and set(body) - {"status", "error"}:
            # Not Bouncer's usual shape: show the body itself rather than nothing.
            message = self._clip(json.dumps(body, ensure_ascii=False))
        return "%s: %s" % (error, message) if message else error

    def _short_reason(self, exc):
        return self._clip(without_query_strings(root_reason(exc))) or type(exc).__name__

    def _snippet(self, content):
        """The start of a body as one readable line: tags dropped, key scrubbed before cutting."""
        text = (content or b"")[:SNIPPET_SOURCE_BYTES].decode("utf-8", errors="replace")
        text = self._scrub(text)
        if "<" in text and ">" in text:
            text = re.sub(r"<[^>]*>", " ", text)
        return self._clip(text)

    def _clip(self, value):
        if value is None:
            return ""
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        # Scrub before cutting, or a key cut in half would slip through.
        text = one_line(self._scrub(text))
        return text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS] + "..."

    def _scrub(self, text):
        return mask_secrets(text, [self._api_key])

    def _error(self, operation, status, text):
        message = self._scrub(one_line(text))
        log.debug("%s", message)
        return BouncerError(message, status=status, operation=operation)


class Record(dict):
    """A download record, with `raw`: its JSON text exactly as Bouncer sent it."""
    __slots__ = ("raw",)


# After a record of the download's array: a comma and the next record, or the array's end.
AFTER_RECORD = re.compile(r"[ \t\r\n]*(?:(,)[ \t\r\n]*|\])")
SPACE = re.compile(r"[ \t\r\n]*")


def parse_records(content):
    """A download body: a JSON array whose objects come back as Records carrying their own text,
    so that storing the raw record costs a slice, not a second encoding. Anything but an array
    is parsed plainly (the caller reports it). Each record is read by the json module's own
    scanner; what lies between them is matched by one regular expression (measured on 10,000
    records: 70 ms against 99 ms when found character by character; `json.loads`: 48 ms)."""
    text = content.decode("utf-8") if isinstance(content, bytes) else content
    position = SPACE.match(text).end()
    if not text.startswith("[", position):
        return json.loads(text)
    scan, records = json.JSONDecoder().scan_once, []
    position = SPACE.match(text, position + 1).end()
    if text.startswith("]", position):
        return finished(text, position + 1, records)
    while True:
        try:
            item, end = scan(text, position)
        except StopIteration as exc:
            raise ValueError("expected a value at character %d" % exc.value) from None
        if item.__class__ is dict:
            item = Record(item)
            item.raw = text[position:end]
        records.append(item)
        after = AFTER_RECORD.match(text, end)
        if after is None:
            raise ValueError("expected ',' or ']' at character %d" % end)
        if after.group(1) is None:
            return finished(text, after.end(), records)
        position = after.end()


def parse_optional_json(content):
    """An answer whose body says nothing (finish and delete answer `{}`): an empty one is fine."""
    return json.loads(content) if content.strip() else {}


def finished(text, end, records):
    """The records, once nothing but white space follows the array's end."""
    if SPACE.match(text, end).end() != len(text):
        raise ValueError("extra data after the array")
    return records


def normalize_path(path):
    return "/" + path.strip().strip("/")


def quote_batch_id(batch_id):
    if not isinstance(batch_id, str) or not batch_id.strip():
        raise ValueError("batch id must be a non-empty string, got %r" % (batch_id,))
    # safe="": a slash in an id must not turn into another path segment.
    return quote(batch_id, safe="")


def check_emails(emails):
    if not emails:
        raise ValueError("a Bouncer batch needs at least one email")
    if len(emails) > MAX_BATCH_EMAILS:
        raise ValueError("a Bouncer batch holds at most %d emails, got %d" % (MAX_BATCH_EMAILS, len(emails)))
    not_strings = sum(1 for email in emails if not isinstance(email, str))
    if not_strings:
        raise ValueError("%d of the emails are not strings" % not_strings)


def parse_status(value):
    """Bouncer's body status as an int: it is sometimes a number, sometimes a string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def embedded_error_status(answer):
    """The error status of a 2xx body shaped like Bouncer's error body, else None."""
    if not isinstance(answer, dict) or "error" not in answer:
        return None
    status = parse_status(answer.get("status"))
    return status if status is not None and status >= 400 else None


def hint_for(code):
    hint = HINTS.get(code)
    return " (%s)" % hint if hint else ""


def standard_phrase(code):
    try:
        return http.HTTPStatus(code).phrase
    except ValueError:
        return "Error"


def is_timeout(exc):
    if isinstance(exc, requests.Timeout):
        return True
    # requests reports a read timeout while reading the body as a ConnectionError around urllib3's.
    return any(isinstance(arg, urllib3.exceptions.TimeoutError) for arg in getattr(exc, "args", ()))


def root_reason(exc):
    """The innermost cause worth showing, without urllib3's connection-object prefix."""
    reason = exc
    for _ in range(5):
        inner = getattr(reason, "reason", None)
        if inner is None and reason.args and isinstance(reason.args[0], BaseException):
            inner = reason.args[0]
        if not isinstance(inner, BaseException):
            break
        reason = inner
    text = str(reason)
    return re.sub(r"^(<[^>]*>|\w+\(host=[^)]*\)):\s*", "", text)


def without_query_strings(text):
    # Transport errors quote the request URL, whose query may hold a callback URL with a secret.
    return re.sub(r"\?[^\s'\"()]+", "", text)


def without_query(url):
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def one_line(text):
    return " ".join(str(text).split())


def format_seconds(seconds):
    if isinstance(seconds, (int, float)):
        return "%gs" % seconds
    return "%ss" % (seconds,)
