"""Email addresses: the local syntax check, and stripping modifiers down to one global identity.

The syntax check is email-validator's (a maintained implementation of the RFCs, with
internationalised addresses), run without DNS: deliverability is what Bouncer is paid for.
"""
import re

from email_validator import EmailNotValidError, validate_email

GMAIL_DOMAINS = frozenset({"gmail.com", "googlemail.com"})

# Providers where `local+tag@domain` reaches the same mailbox as `local@domain`.
PLUS_TAG_DOMAINS = frozenset({
    "outlook.com", "hotmail.com", "live.com", "msn.com",
    "icloud.com", "me.com", "mac.com",
    "fastmail.com", "fastmail.fm",
    "proton.me", "protonmail.com", "protonmail.ch", "pm.me",
    "sandbox.usebouncer.com",
})
# Microsoft also runs country domains (hotmail.co.uk, outlook.fr, live.de, ...).
MICROSOFT_COUNTRY_DOMAIN = re.compile(r"^(hotmail|outlook|live)\.([a-z]{2,3}|co\.[a-z]{2}|com\.[a-z]{2})$")


def syntax_error(address):
    """None when `address` is a syntactically valid email address, else why it is not."""
    try:
        validate_email(address, check_deliverability=False)
    except EmailNotValidError as exc:
        return str(exc)
    return None


def strip_email_modifiers(address):
    """The address that identifies a mailbox: lowercased, with provider-specific modifiers gone.

    Gmail ignores dots and `+tags` (and googlemail.com is gmail.com); Outlook, iCloud, Fastmail,
    Proton and Bouncer's sandbox ignore `+tags`; elsewhere only case is folded.
    """
    address = address.strip().lower()
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return address
    if domain in GMAIL_DOMAINS:
        local, domain = drop_plus_tag(local).replace(".", ""), "gmail.com"
    elif domain in PLUS_TAG_DOMAINS or MICROSOFT_COUNTRY_DOMAIN.match(domain):
        local = drop_plus_tag(local)
    # `+tag@gmail.com` has nothing left of its local part: keep it whole rather than invent one.
    return "%s@%s" % (local, domain) if local else address


def drop_plus_tag(local):
    return local.split("+", 1)[0]
