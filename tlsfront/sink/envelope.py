"""Envelope rules: the address of a MAIL/RCPT argument, and the rcpthosts test."""

from __future__ import annotations

ADDRESS_LIMIT = 900


def parse_address(arg: bytes) -> bytes | None:
    """The address of a MAIL/RCPT argument as qmail-smtpd's addrparse takes it.

    No check of ``FROM:``/``TO:``: qmail looks for ``<`` (else takes what follows
    ``:`` up to a space), strips a source route, quotes and backslashes.
    ``None`` for an address over 900 octets.
    """
    terminator = 0x3E  # '>'
    lt = arg.find(b"<")
    if lt >= 0:
        arg = arg[lt + 1 :]
    else:
        terminator = 0x20
        colon = arg.find(b":")
        arg = b"" if colon < 0 else arg[colon + 1 :].lstrip(b" ")
    if arg.startswith(b"@"):
        colon = arg.find(b":")
        arg = b"" if colon < 0 else arg[colon + 1 :]
    addr = bytearray()
    escaped = quoted = False
    for ch in arg:
        if escaped:
            addr.append(ch)
            escaped = False
        elif ch == terminator and not quoted:
            break
        elif ch == 0x5C:
            escaped = True
        elif ch == 0x22:
            quoted = not quoted
        else:
            addr.append(ch)
    if len(addr) + 1 > ADDRESS_LIMIT:
        return None
    return bytes(addr)


def rcpthost_allowed(address: bytes, rcpthosts: frozenset[bytes] | None) -> bool:
    """qmail's rcpthosts rule: no list allows all; no ``@`` is local; else the
    domain, or any suffix of it starting at a dot (``.example.com``), is listed."""
    if rcpthosts is None:
        return True
    at = address.rfind(b"@")
    if at < 0:
        return True
    host = address[at + 1 :].lower()
    return any((j == 0 or host[j] == 0x2E) and host[j:] in rcpthosts for j in range(len(host)))
