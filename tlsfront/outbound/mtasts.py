"""MTA-STS (RFC 8461): the TXT record, the HTTPS policy, the cache.

For a destination domain: `_mta-sts.DOMAIN` TXT says a policy exists and
its `id`; the policy comes from `https://mta-sts.DOMAIN/.well-known/mta-sts.txt`
(certificate verified for that name, no redirects, 200 with text/plain, at
most 64 KiB) and is kept for its `max_age`. A cached policy whose id still
matches the TXT record is used without fetching; while the TXT record is
missing, or the fetch fails, an unexpired cached policy stays in force (RFC
8461 §5.1). With nothing cached and nothing fetched there is no policy.

`enforce` requires TLS, a certificate valid for the MX host (WebPKI) and an
MX host matching a `mx:` pattern; `testing` only logs what would fail.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio

from tlsfront.outbound.mx import Dns, DnsFailure
from tlsfront.tls.client import ClientContext, client_stream

log = logging.getLogger("tlsfront.outbound")

MAX_POLICY = 64 * 1024
MAX_AGE_LIMIT = 31557600
POLICY_PATH = "/.well-known/mta-sts.txt"

Connector = Callable[[str, int], Awaitable[trio.abc.Stream]]


class StsError(Exception):
    """A TXT record or a policy that cannot be used."""


@dataclass(frozen=True)
class StsPolicy:
    mode: str  # "enforce", "testing" or "none"
    mx: tuple[str, ...]
    max_age: int


_ID = re.compile(r"[A-Za-z0-9]{1,32}")


def parse_txt(records: Sequence[str]) -> str | None:
    """The policy id from the TXT records, or None when there is no valid one.

    Exactly one record must start with `v=STSv1`; several mean no policy.
    """
    found = [r for r in records if re.match(r"v=STSv1\s*(;|$)", r)]
    if len(found) != 1:
        return None
    fields: dict[str, str] = {}
    for part in found[0].split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    policy_id = fields.get("id", "")
    return policy_id if _ID.fullmatch(policy_id) else None


def parse_policy(text: str) -> StsPolicy:
    """A policy file's content; raises StsError when it is not valid."""
    version = mode = max_age = None
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise StsError("malformed policy line")
        key, value = key.strip(), value.strip()
        if key == "version" and version is None:
            version = value
        elif key == "mode" and mode is None:
            mode = value
        elif key == "max_age" and max_age is None:
            if not value.isdigit() or len(value) > 10:
                raise StsError("malformed max_age")
            max_age = min(int(value), MAX_AGE_LIMIT)
        elif key == "mx":
            mx.append(value.lower().rstrip("."))
    if version != "STSv1":
        raise StsError("version is not STSv1")
    if mode not in ("enforce", "testing", "none"):
        raise StsError("mode must be enforce, testing or none")
    if max_age is None:
        raise StsError("max_age missing")
    if mode != "none" and not mx:
        raise StsError("no mx pattern")
    return StsPolicy(mode, tuple(mx), max_age)


def mx_matches(patterns: Sequence[str], host: str) -> bool:
    """True when `host` matches a `mx:` pattern (`*.` stands for one label)."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        if pattern.startswith("*."):
            head, dot, rest = host.partition(".")
            if head and dot and rest == pattern[2:]:
                return True
        elif pattern == host:
            return True
    return False


def parse_response(raw: bytes) -> str:
    """The body of an HTTP/1.0 or 1.1 response; only a plain 200 text/plain will do."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise StsError("incomplete HTTP response")
    status, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise StsError("not an HTTP response")
    if parts[1] != "200":
        raise StsError(f"HTTP status {parts[1]}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if not headers.get("content-type", "").lower().startswith("text/plain"):
        raise StsError("policy is not text/plain")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise StsError("chunked response to an HTTP/1.0 request")
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit() or int(length) > len(body):
            raise StsError("truncated policy")
        body = body[: int(length)]
    if len(body) > MAX_POLICY:
        raise StsError("policy too large")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise StsError("policy is not UTF-8") from None


async def fetch_policy(
    domain: str, dns_: Dns, ctx: ClientContext, connect: Connector, port: int
) -> str:
    """GET the policy over HTTPS (the caller bounds the time)."""
    host = f"mta-sts.{domain}"
    addresses = await dns_.addresses(host)
    if not addresses:
        raise StsError(f"{host} has no address")
    transport = await connect(addresses[0], port)
    stream = client_stream(transport, ctx, host, https=True)
    try:
        await stream.do_handshake()
        request = (
            f"GET {POLICY_PATH} HTTP/1.0\r\nHost: {host}\r\n"
            "User-Agent: tlsfront\r\nConnection: close\r\n\r\n"
        )
        await stream.send_all(request.encode("ascii"))
        raw = bytearray()
        while chunk := await stream.receive_some(16384):
            raw += chunk
            if len(raw) > MAX_POLICY + 16384:
                raise StsError("policy too large")
    finally:
        await trio.aclose_forcefully(stream)
    return parse_response(bytes(raw))


@dataclass
class _Entry:
    policy: StsPolicy
    policy_id: str
    expires: float


@dataclass
class StsCache:
    """Policies by domain, for their max_age (trio's clock)."""

    entries: dict[str, _Entry] = field(default_factory=dict)
    fetch_timeout: float = 60.0

    async def policy(
        self,
        domain: str,
        dns_: Dns,
        ctx: ClientContext,
        connect: Connector,
        port: int = 443,
    ) -> StsPolicy | None:
        now = trio.current_time()
        entry = self.entries.get(domain)
        if entry is not None and entry.expires <= now:
            del self.entries[domain]
            entry = None
        try:
            answer = await dns_.query(f"_mta-sts.{domain}", "TXT")
            texts = [b"".join(r.strings).decode("utf-8", "replace") for r in answer.records]  # type: ignore[attr-defined]
            policy_id = parse_txt(texts)
        except DnsFailure:
            policy_id = None
        if policy_id is None or (entry is not None and entry.policy_id == policy_id):
            return entry.policy if entry is not None else None
        try:
            with trio.fail_after(self.fetch_timeout):
                policy = parse_policy(await fetch_policy(domain, dns_, ctx, connect, port))
        except (
            StsError,
            DnsFailure,
            OSError,
            ValueError,
            trio.TooSlowError,
            trio.BrokenResourceError,
        ) as err:
            log.warning("mta-sts domain=%s policy fetch failed: %s", domain, err or type(err))
            return entry.policy if entry is not None else None
        log.info(
            "mta-sts domain=%s id=%s mode=%s max_age=%d",
            domain,
            policy_id,
            policy.mode,
            policy.max_age,
        )
        self.entries[domain] = _Entry(policy, policy_id, now + policy.max_age)
        return policy
