"""What a password verifier promises the session.

A verifier gets the credentials of one completed exchange and the session's
UCSPI environment (`TCPREMOTEIP`, `TCPLOCALIP`, `SSL_PROTOCOL`, ...: what
the backend would get) and says GOOD, BAD or TEMPFAIL. It never raises for
a verdict: a verifier that cannot decide (a program that fails or times
out, a socket that is gone) says TEMPFAIL, which the client sees as
`454 4.7.0`. `detail` explains a TEMPFAIL for the log; it never contains the
password. The session wipes the credentials when `verify` returns.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from tlsfront.auth import replies
from tlsfront.auth.sasl import Credentials
from tlsfront.smtp.reply import Reply


class Verdict(enum.Enum):
    GOOD = "good"
    BAD = "bad"
    TEMPFAIL = "tempfail"


@dataclass(frozen=True)
class AuthResult:
    verdict: Verdict
    user: str  # as the verifier knows it (Dovecot may rewrite it)
    detail: str = ""

    @property
    def reply(self) -> Reply:
        """What the client is told."""
        if self.verdict is Verdict.GOOD:
            return replies.SUCCEEDED
        if self.verdict is Verdict.BAD:
            return replies.INVALID
        return replies.TEMPFAIL


class Verifier(Protocol):
    """A password check: `checkpassword` or `dovecot` in the configuration."""

    @property
    def name(self) -> str: ...

    async def verify(self, creds: Credentials, env: Mapping[str, str]) -> AuthResult: ...


__all__ = ["AuthResult", "Verdict", "Verifier"]
