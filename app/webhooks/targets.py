"""Webhook targets (SSRF): a URL on a non-public address is refused, at submit from the URL and again at send time
from what the name resolves to; the request then goes to the checked address, so a DNS answer that changes in
between cannot redirect it."""

from __future__ import annotations

import ipaddress
import socket

import httpx

LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


class UnsafeTarget(ValueError):
    """A webhook URL that must not be called: a bad scheme, or a non-public address not in the allowlist."""


IP = ipaddress.IPv4Address | ipaddress.IPv6Address


# IPv6 forms whose last 32 bits are an IPv4 address the packet reaches: IPv4-mapped, IPv4-compatible (RFC 4291;
# :: and ::1 included, as 0.0.0.0 and 0.0.0.1), IPv4-translated (RFC 2765) and the well-known NAT64 prefix (RFC 6052).
V4_IN_LAST_32 = tuple(ipaddress.ip_network(n) for n in ("::ffff:0:0/96", "::/96", "::ffff:0:0:0/96", "64:ff9b::/96"))
# Local-use NAT64 (RFC 8215): where the IPv4 address sits depends on the operator's prefix length, so it cannot be
# checked; never globally reachable (IANA), refused whole unless allowlisted.
LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...] | None:
    """The IPv4 addresses an IPv6 address carries and would lead to: the last 32 bits of the forms above, the
    6to4 gateway (2002:V4ADDR::/48), a Teredo address's server and client (2001::/32); None for plain IPv6."""
    if any(ip in net for net in V4_IN_LAST_32):
        return (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF),)
    if ip.sixtofour is not None:
        return (ip.sixtofour,)
    return ip.teredo


def is_public(ip: IP) -> bool:
    """Whether a webhook may go to this address: global unicast; an IPv6 address that embeds IPv4 addresses
    (mapped, NAT64, 6to4, Teredo...) is judged by the IPv4 rules on each of them."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in LOCAL_NAT64:
            return False
        embedded = embedded_ipv4(ip)
        if embedded is not None:
            return all(is_public(v4) for v4 in embedded)
    return ip.is_global and not ip.is_multicast


def _allowlisted(host: str, ip: IP | None, allowlist: list[str]) -> bool:
    name = host.lower().rstrip(".")
    for entry in allowlist:
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            if name == entry.lower().rstrip("."):
                return True
            continue
        if ip is not None and ip.version == net.version and ip in net:
            return True
    return False


def _literal_ip(host: str) -> IP | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        pass
    try:  # the forms inet_aton accepts and a resolver would too: 2130706433, 127.1, 0x7f.0.0.1
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _parts(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise UnsafeTarget(f"not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise UnsafeTarget("only http and https URLs are allowed")
    if not parsed.host:
        raise UnsafeTarget("the URL has no host")
    if parsed.userinfo:
        raise UnsafeTarget("credentials in the URL are not allowed (they would be shown in delivery records)")
    return parsed


def check_url(url: str, allowlist: list[str]) -> None:
    """The submit-time check: scheme, and the host when it is an address or a local name (names are resolved,
    and checked again, at send time). Raises UnsafeTarget."""
    host = _parts(url).host
    ip = _literal_ip(host)
    if _allowlisted(host, ip, allowlist):
        return
    if ip is not None and not is_public(ip):
        raise UnsafeTarget(f"{host} is not a public address (allow it with SQUEEZE_WEBHOOK_ALLOWLIST)")
    name = host.lower().rstrip(".")
    if ip is None and (name in LOCAL_NAMES or name.endswith(".localhost")):
        raise UnsafeTarget(f"{host} is a local name (allow it with SQUEEZE_WEBHOOK_ALLOWLIST)")


def resolve_target(url: str, allowlist: list[str]) -> str:
    """The send-time check: every address the host resolves to must be public or allowlisted. Returns the address
    to connect to. Raises UnsafeTarget (permanent) or OSError (DNS failure: worth a retry)."""
    parsed = _parts(url)
    check_url(url, allowlist)
    host = parsed.host
    infos = socket.getaddrinfo(host, parsed.port or (443 if parsed.scheme == "https" else 80),
                               type=socket.SOCK_STREAM)
    ips = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    if not ips:
        raise OSError(f"{host} does not resolve")
    host_allowed = _allowlisted(host, None, allowlist)
    for ip in ips:
        if not (host_allowed or is_public(ip) or _allowlisted(host, ip, allowlist)):
            raise UnsafeTarget(f"{host} resolves to {ip}, which is not a public address "
                               "(allow it with SQUEEZE_WEBHOOK_ALLOWLIST)")
    return str(ips[0])
