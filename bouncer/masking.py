"""Keeping secrets out of text: every log line, error message, page and answer goes through here."""
import json
from urllib.parse import quote, urlsplit

MASK = "***"


def mask_secrets(text, secrets):
    """`text` with each of `secrets` replaced by MASK, in every form an echo may take: as is,
    URL-quoted, or escaped inside a repr or a JSON string. Longest first, so that a secret
    holding another is masked whole."""
    forms = set()
    for secret in secrets:
        if secret:
            forms.update((secret, quote(secret, safe=""), repr(secret)[1:-1], json.dumps(secret)[1:-1]))
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, MASK)
    return text


def redact_url(url):
    """The URL with any password replaced, safe for logs and answers."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return url
    if password:
        return url.replace(":%s@" % password, ":%s@" % MASK, 1)
    return url
