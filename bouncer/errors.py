"""Exception types, one per seam. Each message is one line a person can act on."""


class ConfigError(Exception):
    """A setting has a value the service cannot run with."""


class InputError(Exception):
    """Submitted input cannot be used (file, line, value named); nothing was written."""


class MalformedInput(InputError):
    """The input is not even of the expected form (a body that is not JSON, say)."""


class Conflict(Exception):
    """The request conflicts with the state of what it names (an ended batch, a reused key)."""


class NotFound(Exception):
    """A user batch id that does not exist."""


class Gone(Exception):
    """What was asked for existed and was removed on purpose (rows past the retention period)."""


class DatabaseUnavailable(Exception):
    """The database cannot be opened or used; the message names it without secrets."""


class BouncerError(Exception):
    """One exception type for every failed Bouncer call: transport, timeout, HTTP error, bad body."""

    def __init__(self, message: str, status: int | None = None, operation: str = "",
                 timed_out: bool = False):
        super().__init__(message)
        self.message = message
        self.status = status
        self.operation = operation
        # Sent but unanswered: Bouncer may have acted on the request anyway.
        self.timed_out = timed_out

    def __str__(self):
        return self.message

    def __reduce__(self):
        # Keep status and operation when the error crosses a process boundary.
        return (type(self), (self.message, self.status, self.operation, self.timed_out))

    @property
    def is_out_of_credits(self):
        return self.status == 402

    @property
    def is_not_found(self):
        return self.status == 404

    @property
    def is_results_gone(self):
        # A 405 whose message says the addresses and results were removed (Bouncer's Java SDK
        # handles it) is final: asking again never helps. Told apart by the words, leniently.
        text = self.message.lower()
        return self.status == 405 and any(word in text for word in ("remov", "delet", "expired", "no longer"))

    @property
    def is_not_ready(self):
        # Bouncer answers 405 to a download asked for before the batch completed.
        return self.status == 405 and not self.is_results_gone

    @property
    def is_not_running(self):
        # Bouncer refuses to finish a batch that is not running ("batch has to be running to
        # finish"): still queued, or completed already.
        return self.status == 400 and self.operation == "finish"

    @property
    def is_not_deletable_yet(self):
        # "batch cannot be deleted in current state": it is still running.
        return self.status == 405 and self.operation == "delete"

    @property
    def ends_cycle(self):
        # Another call this cycle would hit the same wall: limit, empty account or bad key.
        return self.status in (429, 402, 401)
