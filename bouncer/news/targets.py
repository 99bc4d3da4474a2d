"""Where a webhook may go (design.md, "Tenants on the HTTP door").

A batch's `callback_url` comes from whoever holds an API token, so it must not make the service
a door into its own host or network: a URL whose host resolves to a loopback, private,
link-local, multicast or reserved address (any spelling: `127.1`, `2130706433`, `[::1]`,
`::ffff:127.0.0.1`, or a name) is refused at submit, and again before each delivery, since a
name may resolve elsewhere by then, unless WEBHOOK_ALLOW_PRIVATE=true (hosts on a private
network, local runs). A delivery then connects to the very address that was checked (`session`),
so a name that changes between the check and the connection changes nothing. Credentials in a
callback_url are refused. The operator's own WEBHOOK_URL is trusted as set.

Names are resolved by `resolve` alone: the one place tests replace, so that none asks DNS.
"""
import ipaddress
import socket
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import connection

RULE = ("callback_url must name a host that resolves to public addresses only (not loopback, private, "
        "link-local, multicast or reserved); WEBHOOK_ALLOW_PRIVATE=true on the service allows them")


class Refused(Exception):
    """The URL's host resolves to an address a callback may not reach."""


class Unresolvable(Exception):
    """The URL's host does not resolve now."""


class RefusedConnection(NewConnectionError):
    """A delivery's connection refused before it was made: its host resolved to an address a
    callback may not reach."""


def refused_connection(exc):
    """Whether a requests exception is a RefusedConnection."""
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, RefusedConnection)


def resolve(host, port):
    """The addresses `host` resolves to."""
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def url_problem(url):
    """Why `url` cannot be a callback_url at all, or None (no lookup is made)."""
    if not isinstance(url, str):
        return "callback_url must be a string"
    try:
        parts = urlsplit(url)
        parts.port    # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        return "callback_url must be an http or https URL with a host"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "callback_url must be an http or https URL with a host"
    if parts.username is not None or parts.password is not None:
        return "callback_url must not hold credentials (user:password@): a receiver authenticates the signature"
    return None


def submit_problem(url, allow_private):
    """Why a submit may not take `url` as its callback_url, or None."""
    problem = url_problem(url)
    if problem or allow_private:
        return problem
    try:
        check_public(url)
    except (Refused, Unresolvable):
        return RULE      # one answer for both: an answer must not tell which internal names exist
    return None


def check_public(url):
    """Refused or Unresolvable unless every address the URL's host resolves to is public."""
    parts = urlsplit(url)
    public_addresses(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))


def public_addresses(host, port):
    """The addresses of `host`, each one public; Refused or Unresolvable otherwise."""
    try:
        addresses = resolve(host, port)
    except (OSError, UnicodeError) as exc:
        raise Unresolvable("%s does not resolve (%s)" % (host, exc)) from None
    if not addresses:
        raise Unresolvable("%s does not resolve" % host)
    if not all(is_public(address) for address in addresses):
        raise Refused(RULE)
    return addresses


def is_public(address):
    """Whether an address, and any IPv4 address carried inside it, is a public unicast one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])     # an IPv6 zone (`fe80::1%eth0`) aside
    return all(one.is_global and not (one.is_multicast or one.is_reserved) for one in (ip, *carried(ip)))


def carried(ip):
    """IPv4 addresses inside an IPv6 one: mapped, 6to4, Teredo, NAT64."""
    if ip.version == 4:
        return []
    found = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
    if ip in NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [one for one in found if one is not None]


NAT64 = ipaddress.ip_network("64:ff9b::/96")


# -- delivery: connect only to the address that was checked --

class PublicOnly:
    """urllib3's connection, resolving through `resolve` and connecting only to a public address
    (the one checked is the one reached)."""

    def _new_conn(self):
        try:
            address = public_addresses(self._dns_host, self.port)[0]
        except Refused as exc:
            raise RefusedConnection(self, str(exc)) from None
        except Unresolvable as exc:
            raise NameResolutionError(self.host, self, socket.gaierror(str(exc))) from None
        try:
            return connection.create_connection((address, self.port), self.timeout,
                                                source_address=self.source_address,
                                                socket_options=self.socket_options)
        except TimeoutError:
            raise ConnectTimeoutError(self, "Connection to %s timed out" % self.host) from None
        except OSError as exc:
            raise NewConnectionError(self, "Failed to establish a new connection: %s" % exc) from None


class PublicHTTPConnection(PublicOnly, HTTPConnection):
    pass


class PublicHTTPSConnection(PublicOnly, HTTPSConnection):
    pass


class PublicHTTPPool(HTTPConnectionPool):
    ConnectionCls = PublicHTTPConnection


class PublicHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = PublicHTTPSConnection


class PublicOnlyAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": PublicHTTPPool, "https": PublicHTTPSPool}


def public_only_session():
    """A requests session that reaches public addresses only."""
    session = requests.Session()
    adapter = PublicOnlyAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
