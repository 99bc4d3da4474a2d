"""Tenants on the HTTP door (design.md, "Tenants on the HTTP door"): each API token lists, reads,
cancels and erases only the user batches it created; another's batch, or one that came in by the
SQL door or the CLI (they belong to no token), answers exactly as a batch that does not exist.
A token of API_OPERATOR_TOKENS sees every batch.

A batch keeps the token that created it as a SHA-256 digest (`user_batches.api_token_digest`),
never the token. Every route that names a batch asks `own_batch_or_404` first.
"""
import hashlib
from dataclasses import dataclass

from apiflask import abort
from flask import g

from bouncer.errors import NotFound
from bouncer.reading.batches import get_user_batch


@dataclass(frozen=True)
class Caller:
    """The token of a request: its digest, and whether it sees every batch."""
    token_digest: str
    sees_all: bool = False

    def may_see(self, batch):
        return self.sees_all or batch.api_token_digest == self.token_digest

    @property
    def listing_filter(self):
        """The api_token_digest a listing keeps to; None: every batch."""
        return None if self.sees_all else self.token_digest


def token_digest(token):
    return hashlib.sha256(token.encode()).hexdigest()


def set_caller(token, sees_all):
    g.caller = Caller(token_digest(token), sees_all)


def caller():
    return g.caller


def own_batch_or_404(batch_id):
    """The user batch `batch_id` when the calling token may see it; otherwise the 404 of a batch
    that does not exist, so that no token learns whether another's batch exists."""
    try:
        batch = get_user_batch(batch_id)
    except NotFound:
        abort(404)
    if not caller().may_see(batch):
        abort(404)
    return batch
