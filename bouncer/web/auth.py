"""The one bearer-token check of the web process: the API (API_TOKENS), /metrics (METRICS_TOKEN)
and the server's body bound (a large body only for a valid API token) all ask it."""
import hmac


def bearer_token(authorization):
    """The token of an `Authorization: Bearer <token>` header value, or "" for anything else."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def token_matches(token, tokens):
    """Whether `token` is one of `tokens`. Every token is compared, in constant time, whatever
    matched first, so the time taken says nothing of which."""
    if not token:
        return False
    given = token.encode()
    return any([hmac.compare_digest(given, known.encode()) for known in tokens])  # noqa: C419 (a list: all compared)
