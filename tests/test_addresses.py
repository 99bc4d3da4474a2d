"""Addresses: stripping modifiers down to one mailbox identity, and the local syntax check."""
import pytest

from bouncer.addresses import strip_email_modifiers, syntax_error


@pytest.mark.parametrize("address, stripped", [
    ("johndoe@gmail.com", "johndoe@gmail.com"),
    ("John.Doe@gmail.com", "johndoe@gmail.com"),
    ("j.o.h.n.d.o.e@gmail.com", "johndoe@gmail.com"),
    ("john.doe+news@gmail.com", "johndoe@gmail.com"),
    ("john.doe+news+more@gmail.com", "johndoe@gmail.com"),
    ("JOHN.DOE+News@GMAIL.COM", "johndoe@gmail.com"),
    ("john.doe@googlemail.com", "johndoe@gmail.com"),
    ("John.Doe+x@GoogleMail.com", "johndoe@gmail.com"),
])
def test_strip_gmail_dots_tags_case_and_googlemail(address, stripped):
    assert strip_email_modifiers(address) == stripped


@pytest.mark.parametrize("address, stripped", [
    ("first.last+tag@outlook.com", "first.last@outlook.com"),
    ("First.Last+Tag@Hotmail.com", "first.last@hotmail.com"),
    ("first.last+tag@live.com", "first.last@live.com"),
    ("first.last+tag@msn.com", "first.last@msn.com"),
    ("first.last+tag@hotmail.co.uk", "first.last@hotmail.co.uk"),
    ("first.last+tag@outlook.fr", "first.last@outlook.fr"),
    ("first.last+tag@live.de", "first.last@live.de"),
    ("first.last+tag@outlook.com.au", "first.last@outlook.com.au"),
    ("first.last+tag@HOTMAIL.CO.UK", "first.last@hotmail.co.uk"),
])
def test_strip_microsoft_drops_tag_keeps_dots(address, stripped):
    assert strip_email_modifiers(address) == stripped


@pytest.mark.parametrize("address, stripped", [
    ("first.last+tag@icloud.com", "first.last@icloud.com"),
    ("First.Last+tag@me.com", "first.last@me.com"),
    ("first.last+tag@mac.com", "first.last@mac.com"),
    ("first.last+tag@fastmail.com", "first.last@fastmail.com"),
    ("first.last+tag@fastmail.fm", "first.last@fastmail.fm"),
    ("first.last+tag@proton.me", "first.last@proton.me"),
    ("first.last+tag@protonmail.com", "first.last@protonmail.com"),
    ("first.last+tag@protonmail.ch", "first.last@protonmail.ch"),
    ("first.last+tag@pm.me", "first.last@pm.me"),
    ("first.last+tag@sandbox.usebouncer.com", "first.last@sandbox.usebouncer.com"),
    ("First.Last+Tag@Sandbox.UseBouncer.com", "first.last@sandbox.usebouncer.com"),
])
def test_strip_plus_tag_providers_drop_tag_keep_dots(address, stripped):
    assert strip_email_modifiers(address) == stripped


@pytest.mark.parametrize("address, stripped", [
    ("First.Last+Tag@Example.com", "first.last+tag@example.com"),
    ("a.b@yahoo.com", "a.b@yahoo.com"),
    ("a+b@gmail.com.example.org", "a+b@gmail.com.example.org"),
    ("a+b@hotmail.co.uk.example.org", "a+b@hotmail.co.uk.example.org"),
    ("a+b@myhotmail.com", "a+b@myhotmail.com"),
    ("a.b+c@sub.gmail.com", "a.b+c@sub.gmail.com"),
])
def test_strip_other_domains_only_lowercase(address, stripped):
    assert strip_email_modifiers(address) == stripped


@pytest.mark.parametrize("address, stripped", [
    ("+tag@gmail.com", "+tag@gmail.com"),          # nothing left of the local part: kept whole
    ("+Tag@Outlook.com", "+tag@outlook.com"),
    ("no-at-sign", "no-at-sign"),
    ("NoAtSign", "noatsign"),
    ("", ""),
    ("  John.Doe+x@Gmail.com \t\n", "johndoe@gmail.com"),
    ("  A@Example.COM  ", "a@example.com"),
])
def test_strip_edge_cases(address, stripped):
    assert strip_email_modifiers(address) == stripped


@pytest.mark.parametrize("address", ["idn@bücher.example", "idn@xn--bcher-kva.example", "IDN@BÜCHER.example",
                                     "idn@XN--BCHER-KVA.EXAMPLE", "idn@bücher\u3002example"])
def test_strip_gives_an_internationalised_domain_one_spelling(address):
    assert strip_email_modifiers(address) == "idn@bücher.example"


def test_strip_applies_a_providers_rules_to_its_domain_in_any_spelling():
    assert strip_email_modifiers("a.b+x@XN--ZZ.com") == "a.b+x@xn--zz.com"       # not a valid A-label: as is
    assert strip_email_modifiers("J.Doe+x@GMAIL.com") == strip_email_modifiers("jdoe@gmail.com")


def test_strip_is_idempotent():
    for address in ("John.Doe+x@googlemail.com", "a.b+c@hotmail.co.uk", "A+b@Example.com", "x@XN--BCHER-KVA.example"):
        once = strip_email_modifiers(address)
        assert strip_email_modifiers(once) == once


@pytest.mark.parametrize("address", [
    "a@example.com",
    "first.last+tag@example.co.uk",
    "o'brien@example.com",
    "=cmd@example.com",
    "+tag@example.com",
    "-dash@example.com",
    "josé@example.com",
    "user@exämple.com",
    "用户@例子.广告",
    "a@xn--bcher-kva.example",
])
def test_syntax_error_none_for_valid(address):
    assert syntax_error(address) is None


@pytest.mark.parametrize("address", [
    "",
    "plainaddress",
    "a b@example.com",
    "a@exa mple.com",
    " a@example.com",
    "a..b@example.com",
    "a@example..com",
    ".a@example.com",
    "a.@example.com",
    "a@localhost",
    "a@example",
    '"a b"@example.com',
    '"quoted"@example.com',
    "@example.com",
    "a@",
    "a@@example.com",
    "a,b@example.com",
])
def test_syntax_error_message_for_invalid(address):
    problem = syntax_error(address)
    assert isinstance(problem, str) and problem.strip()


def test_the_syntax_check_keeps_email_validators_verdicts_over_fuzzed_addresses():
    """The plain-address path (a domain's verdict asked once) says exactly what email-validator
    says of the whole address, message included, for addresses made to hit its edges."""
    import random
    import string

    from bouncer.addresses import syntax_error, validator_error
    rng = random.Random(5)
    alphabet = string.ascii_letters + string.digits + ".-_+@!#$%&'*/=?^`{|}~\"() ,;:<>[]\\é日"
    endings = ["com", "local", "test", "c", "123", "co.uk", "invalid", "localhost", "onion", "arpa",
               "xn--p1ai", "-bad", "a-", ""]
    for _ in range(20000):
        pick = rng.random()
        if pick < 0.5:
            local = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
            domain = "".join(rng.choice(string.ascii_lowercase + "-._" + string.digits)
                             for _ in range(rng.randint(0, 10))) + rng.choice(["", "."]) + rng.choice(endings)
            address = local + "@" + domain
        elif pick < 0.8:
            address = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        else:   # lengths around the limits: 64 before the @, 254 in all, 63 a label
            address = "a" * rng.randint(1, 70) + "@" + ("b" * rng.randint(1, 70) + ".") * rng.randint(1, 4) + "com"
        assert syntax_error(address) == validator_error(address), address
