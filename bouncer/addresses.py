"""Email addresses: the local syntax check, and stripping modifiers down to one global identity.

The syntax check is email-validator's (a maintained implementation of the RFCs, with
internationalised addresses), run without DNS: deliverability is what Bouncer is paid for.
"""
import re
from functools import lru_cache

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
# A plain ASCII address: a dot-atom local part (RFC 5322 3.2.3, the pattern email-validator
# itself tries first) and an ASCII host name. For such an address email-validator's verdict is
# its verdict on the domain alone, once the whole is within 254 characters (it checks the local
# part, then the domain, then the length), so the domain's verdict is asked once and kept:
# domains repeat (gmail.com) where addresses do not, and the domain check is most of the cost
# (measured: 36 us an address, 16 of them in the domain; 3 us with the domain kept).
# Everything else (quotes, unicode, IP literals, display names) goes to email-validator whole.
ATEXT = r"[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]"
PLAIN_ADDRESS = re.compile(r"%s+(?:\.%s+)*@([A-Za-z0-9.-]+)" % (ATEXT, ATEXT))
MAX_ADDRESS_LENGTH = 254


def syntax_error(address):
    """None when `address` is a syntactically valid email address, else why it is not."""
    plain = PLAIN_ADDRESS.fullmatch(address)
    if plain and len(address) <= MAX_ADDRESS_LENGTH:
        return domain_error(plain.group(1))
    return validator_error(address)


@lru_cache(maxsize=65536)
def domain_error(domain):
    """email-validator's verdict on an address at `domain` whose local part is plain."""
    return validator_error("a@" + domain)


def validator_error(address):
    # Imported here: reading results or status never pays for it.
    from email_validator import EmailNotValidError, validate_email
    try:
        validate_email(address, check_deliverability=False)
    except EmailNotValidError as exc:
        return str(exc)
    return None


def strip_email_modifiers(address):
    """The address that identifies a mailbox: lowercased, its domain in one spelling, with
    provider-specific modifiers gone.

    An internationalised domain has two spellings, `bücher.example` and `xn--bcher-kva.example`:
    one mailbox, one credit. Gmail ignores dots and `+tags` (and googlemail.com is gmail.com);
    Outlook, iCloud, Fastmail, Proton and Bouncer's sandbox ignore `+tags`; elsewhere only case
    is folded.
    """
    address = address.strip().lower()
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return address
    domain = one_spelling(domain)
    if domain in GMAIL_DOMAINS:
        local, domain = drop_plus_tag(local).replace(".", ""), "gmail.com"
    elif domain in PLUS_TAG_DOMAINS or MICROSOFT_COUNTRY_DOMAIN.match(domain):
        local = drop_plus_tag(local)
    # `+tag@gmail.com` has nothing left of its local part: keep it whole rather than invent one.
    return "%s@%s" % (local, domain) if local else address


def one_spelling(domain):
    """A domain's Unicode form, as email-validator normalises it (IDNA 2008, UTS 46 mapping):
    `xn--bcher-kva.example` and `BÜCHER.example` are `bücher.example`. An ASCII name with no
    `xn--` label is already in it."""
    if domain.isascii() and "xn--" not in domain:
        return domain
    return unicode_domain(domain)


@lru_cache(maxsize=65536)
def unicode_domain(domain):
    from email_validator import EmailNotValidError, validate_email
    try:
        return validate_email("a@" + domain, check_deliverability=False).domain
    except EmailNotValidError:
        return domain      # not an address anyone could send to: as it is


def drop_plus_tag(local):
    return local.split("+", 1)[0]
