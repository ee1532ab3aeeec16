"""tcprules source files (`/etc/tcp.smtp`), read and looked up as tcpserver does.

Theory of operation
-------------------
A qmail host keeps its access rules as tcprules(1) source and compiles them
into a cdb that tcpserver(1) consults per connection. tlsfront reads the
source and answers the same question; the two steps are reproduced here.

Compiling (`Rules.parse`), line by line as tcprules does:

- `#` in the first column starts a comment; trailing spaces, tabs and the
  newline are dropped; a line without `:` is skipped (tcprules skips it
  silently, we also record a warning). Only LF ends a line: a line that
  ends in CR (a CRLF file) is an error, as with tcprules, and as a CRLF
  `tlsclients` is (`CR_LINE_END`).
- The key is everything before the first `:` that is followed by `allow` or
  `deny` (the IPv6 tcprules of Debian's ucspi-tcp-ipv6 finds it that way, so
  `::1:allow` has the key `::1`; for every line the IPv4 tcprules accepts
  this is simply the first `:`). Nothing is stripped from the key: a key with
  leading blanks is kept and never matches, as with tcprules.
- The instructions are `allow` or `deny`, then nothing but `,NAME=qVALUEq`
  groups: the character after `=` is the quote, whatever it is (`"`, `'`,
  `/`, ...), and the value runs to its next occurrence, so a value may hold
  commas and `=`. Unquoted `VAR=value` is what tcprules rejects, and so do we.
  The one extra check: an empty NAME, or a NUL, is an error here (tcprules
  takes it; no environment can hold it).
- A key with no `=` and no `@` and with a `-` is a range: the number before
  the first `-` (back to the previous `.`) and the one after it (up to the
  next `.`) span exact keys, top capped at 255; `1.2.3.7-9` and `10.2-3.`
  both work, an empty bound counts as 0, a non-number is an error, and a
  range that runs backwards yields no key.
- The same key twice: the first line wins (cdb returns the first record
  added under a key); later ones are recorded as warnings.

Looking up (`Rules.match`), tcpserver's order, first hit wins:

1. INFO@IP, 2. INFO@=HOST, 3. IP, 4. =HOST,
5. prefixes of IP ending in `.` (or `:` for IPv6), longest first,
6. =SUFFIX for each `.`-suffix of HOST, longest first, 7. `=`, 8. the empty key.

Steps with INFO need the ident user (TCPREMOTEINFO), those with HOST a host
name (TCPREMOTEHOST, which tcpserver gets in lower case); they are skipped
without. No rule at all means: allow, set nothing.

IPv6: keys are the addresses as tcpserver prints TCPREMOTEIP, i.e. compressed
and lower case (`2001:db8::1`), and prefixes are textual, ending with `:`
(`2001:db8:` covers 2001:db8::/32), as in ucspi-tcp-ipv6. IPv4-mapped
clients are looked up as IPv4. In addition, CIDR keys as in fehcom's
ucspi-tcp6 (`192.168.0.0/16`, `2001:db8::/32`) are understood; in step 5 all
prefix keys are tried most specific first, a textual IPv4 prefix counting 8
bits per dot and a textual IPv6 prefix 16 bits per colon, ties going to the
earlier line.

The compiled `.cdb` is not read: point `rules` at the source file.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from tlsfront.net.address import unmap
from tlsfront.qmail.control import CR_LINE_END

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_INSTRUCTIONS = ("allow", "deny")
_RANGE_BOUND = re.compile(r"[0-9]*")
_CIDR = re.compile(r"[0-9A-Fa-f:.]+/[0-9]+")
_TRAILING_BLANKS = " \t\n"  # what tcprules trims: not CR


class RulesError(Exception):
    """A rules file that cannot be used; str() is "FILE:LINE: message" (or "FILE: message")."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line
        self.message = message


@dataclass(frozen=True)
class Rule:
    """What one rule says: allow or deny, and the variables to set."""

    allow: bool
    env: Mapping[str, str] = field(hash=False)  # variables to set (RELAYCLIENT="" etc.)
    key: str  # the key it was found under: "127.", "=host.example.com", "" ...
    source: str  # "FILE:LINE"


class _Entry(NamedTuple):
    order: int  # line number: the earlier line wins a tie between prefix keys
    rule: Rule


class _LineError(Exception):
    """A malformed line; the caller adds the file and line."""


def _split(line: str) -> tuple[str, str] | None:
    """Key and instructions; None for a line without ':' (tcprules skips it)."""
    start = 0
    while (colon := line.find(":", start)) >= 0:
        if line.startswith(_INSTRUCTIONS, colon + 1):
            return line[:colon], line[colon + 1 :]
        start = colon + 1
    colon = line.find(":")
    return None if colon < 0 else (line[:colon], line[colon + 1 :])


def _instructions(text: str) -> tuple[bool, dict[str, str]]:
    if text.startswith("allow"):
        allow, rest = True, text[5:]
    elif text.startswith("deny"):
        allow, rest = False, text[4:]
    else:
        raise _LineError(f"instructions must begin with 'allow' or 'deny', not {text[:20]!r}")
    env: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        if rest[pos] != ",":
            raise _LineError(
                f"unexpected {rest[pos:][:20]!r}: after {'allow' if allow else 'deny'} come only"
                ' ,VAR="value" assignments, with no spaces'
            )
        equals = rest.find("=", pos + 1)
        if equals < 0:
            raise _LineError(f'{rest[pos + 1 :][:20]!r} has no "=": write ,VAR="value"')
        name = rest[pos + 1 : equals]
        if equals + 1 == len(rest):
            raise _LineError(f'no value after "{name}=": write {name}="" for an empty value')
        quote = rest[equals + 1]
        end = rest.find(quote, equals + 2)
        if end < 0:
            raise _LineError(
                f"the value of {name} opens with {quote!r} but does not close with it"
                f' (the character after "=" is the quote: write {name}="...")'
            )
        value = rest[equals + 2 : end]
        if not name:
            raise _LineError("empty variable name before '='")
        if "\0" in name or "\0" in value:
            raise _LineError(f"NUL character in variable {name!r}")
        env[name] = value
        pos = end + 1
    return allow, env


def _expand(address: str) -> list[str]:
    """The keys a range stands for (tcprules' abbreviation), or the key itself."""
    if "=" in address or "@" in address:
        return [address]
    dash = address.find("-")
    if dash < 0:
        return [address]
    left = address.rfind(".", 0, dash) + 1
    right = address.find(".", dash + 1)
    if right < 0:
        right = len(address)
    bounds = address[left:dash], address[dash + 1 : right]
    for bound in bounds:
        if not _RANGE_BOUND.fullmatch(bound):
            raise _LineError(f"range {address[left:right]!r}: {bound!r} is not a number")
    low, high = (int(b or "0") for b in bounds)
    return [f"{address[:left]}{n}{address[right:]}" for n in range(low, min(high, 255) + 1)]


def _network(key: str) -> IPNetwork | None:
    if not _CIDR.fullmatch(key):
        return None
    try:
        return ipaddress.ip_network(key, strict=False)
    except ValueError as exc:
        raise _LineError(f"{key!r} is not a network: {exc}") from None


def _key_warning(key: str) -> str | None:
    """Why a key can never match, for a key tcprules accepts all the same."""
    if key[:1].isspace():
        return f"key {key!r} starts with white space and never matches"
    host = key.partition("=")[2] if "=" in key else None
    if host is not None and host != host.lower():
        return f"key {key!r} never matches: host names are looked up in lower case"
    address = key.rpartition("@")[2]
    if host is None and ":" in address:
        try:
            parsed = ipaddress.IPv6Address(address)
        except ValueError:
            return None
        if parsed.ipv4_mapped is not None:
            return f"key {key!r} never matches: IPv4-mapped clients are looked up as IPv4"
        if address != parsed.compressed:
            return f"key {key!r} never matches: write it as {parsed.compressed!r}"
    return None


def _client_ip(ip: str) -> IPAddress:
    """The client address as tcpserver would print it (ValueError if it is none)."""
    return ipaddress.ip_address(unmap(ip))


def _prefix_bits(prefix: str) -> int:
    return 8 * prefix.count(".") if "." in prefix else min(16 * prefix.count(":"), 128)


class Rules:
    """A parsed tcprules source file; `match` answers tcpserver's question."""

    def __init__(
        self,
        path: str,
        keys: Mapping[str, _Entry],
        networks: Mapping[IPNetwork, _Entry],
        warnings: tuple[str, ...],
    ) -> None:
        self.path = path
        self.warnings = warnings  # "FILE:LINE: message" for lines that tcprules takes but
        # that do nothing (no ':', dead keys, repeated keys, empty ranges)
        self._keys = dict(keys)
        self._networks = dict(networks)
        self._lengths = {
            version: sorted({n.prefixlen for n in networks if n.version == version}, reverse=True)
            for version in (4, 6)
        }

    @classmethod
    def load(cls, path: Path) -> Rules:
        """Read and parse the tcprules source file at `path`."""
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise RulesError(str(path), None, f"cannot read: {exc.strerror or exc}") from exc
        if b"\0" in raw[:2048]:
            raise RulesError(
                str(path), None, "is binary, a compiled .cdb? name the source file (/etc/tcp.smtp)"
            )
        return cls.parse(raw.decode("utf-8", errors="surrogateescape"), str(path))

    @classmethod
    def parse(cls, text: str, path: str = "<rules>") -> Rules:
        """Parse tcprules source `text`; `path` names it in errors and in Rule.source."""
        keys: dict[str, _Entry] = {}
        networks: dict[IPNetwork, _Entry] = {}
        warnings: list[str] = []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line or line.startswith("#"):
                continue
            where = f"{path}:{number}"
            line = line.rstrip(_TRAILING_BLANKS)
            if line.endswith("\r"):
                raise RulesError(path, number, CR_LINE_END)
            parts = _split(line)
            if parts is None:
                if line:
                    warnings.append(f"{where}: no ':' in this line; tcprules ignores it")
                continue
            address, instructions = parts
            try:
                allow, env = _instructions(instructions)
                expanded = _expand(address)
                targets = [(key, _network(key)) for key in expanded]
            except _LineError as exc:
                raise RulesError(path, number, str(exc)) from None
            if not expanded:
                warnings.append(f"{where}: range {address!r} is empty: no address matches it")
            frozen_env = MappingProxyType(env)
            repeated: list[str] = []
            for key, network in targets:
                if network is not None:
                    key = f"{network.network_address}/{network.prefixlen}"
                rule = Rule(allow=allow, env=frozen_env, key=key, source=where)
                first = networks.get(network) if network is not None else keys.get(key)
                if first is not None:
                    repeated.append(f"{key!r} (first at {first.rule.source})")
                elif network is not None:
                    networks[network] = _Entry(number, rule)
                else:
                    keys[key] = _Entry(number, rule)
                    if len(targets) == 1 and (why := _key_warning(key)):
                        warnings.append(f"{where}: {why}")
            if repeated:
                shown = ", ".join(repeated[:3]) + (", ..." if len(repeated) > 3 else "")
                warnings.append(
                    f"{where}: repeats {shown}; the first line wins, this one is unused"
                )
        return cls(path, keys, networks, tuple(warnings))

    def __iter__(self) -> Iterator[Rule]:
        """Every rule in effect, in file order."""
        entries = [*self._keys.values(), *self._networks.values()]
        return (entry.rule for entry in sorted(entries, key=lambda e: e.order))

    def __len__(self) -> int:
        return len(self._keys) + len(self._networks)

    def _get(self, key: str) -> Rule | None:
        entry = self._keys.get(key)
        return None if entry is None else entry.rule

    def _prefix(self, addr: IPAddress, text: str) -> Rule | None:
        """Step 5: the most specific prefix key (textual or CIDR) that covers `addr`."""
        best: tuple[int, int, Rule] | None = None  # (-bits, line, rule): smallest wins
        for end in range(len(text), 0, -1):
            if text[end - 1] in ".:" and (entry := self._keys.get(text[:end])) is not None:
                candidate = (-_prefix_bits(text[:end]), entry.order, entry.rule)
                best = candidate if best is None else min(best, candidate, key=lambda c: c[:2])
        for length in self._lengths[addr.version]:
            network = ipaddress.ip_network((addr, length), strict=False)
            if (entry := self._networks.get(network)) is not None:
                candidate = (-length, entry.order, entry.rule)
                best = candidate if best is None else min(best, candidate, key=lambda c: c[:2])
        return None if best is None else best[2]

    def match(self, ip: str, host: str | None = None, info: str | None = None) -> Rule | None:
        """The rule tcpserver follows for a client; None: no rule (allow, set nothing).

        `host` is the client's host name if looked up (TCPREMOTEHOST), `info`
        the ident user (TCPREMOTEINFO). Raises ValueError if `ip` is not an
        IP address.
        """
        addr = _client_ip(ip)
        text = str(addr)
        host = (host.lower().rstrip(".") or None) if host else None
        exact = []
        if info is not None:
            exact.append(f"{info}@{text}")
            if host is not None:
                exact.append(f"{info}@={host}")
        exact.append(text)
        if host is not None:
            exact.append(f"={host}")
        for key in exact:
            if (rule := self._get(key)) is not None:
                return rule
        if (rule := self._prefix(addr, text)) is not None:
            return rule
        if host is not None:
            for index, char in enumerate(host):
                if char == "." and (rule := self._get(f"={host[index:]}")) is not None:
                    return rule
            if (rule := self._get("=")) is not None:
                return rule
        return self._get("")

    def relay_granted(self, ip: str, host: str | None = None) -> Rule | None:
        """The rule that lets connections from `ip` relay (sets RELAYCLIENT), if any.

        Pass `host` when the backend's tcpserver looks host names up (no -H):
        a `=localhost:allow,RELAYCLIENT=""` rule counts then.
        """
        rule = self.match(ip, host)
        if rule is not None and rule.allow and "RELAYCLIENT" in rule.env:
            return rule
        return None
