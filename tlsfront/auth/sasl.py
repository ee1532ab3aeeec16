"""The SASL exchanges of SMTP AUTH, PLAIN and LOGIN, both sides (sans-I/O).

Theory of operation
-------------------
Server side: the dialogue hands `ServerAuth` the argument of the AUTH
command (`PLAIN dGVzdAB0ZXN0AHRlc3Q=`, `LOGIN`, `PLAIN =` ...) and then each
line the client sends, and gets back one `Step` each time:

- `Challenge`: send its reply (a `334`) and feed the client's next line;
- `Credentials`: the exchange is complete; hand them to a verifier;
- `Refused`: send its reply; the AUTH command is over. `attempt` says
  whether it counts as a failed login for the abuse limits (a malformed or
  cancelled exchange does not; a refused authorization identity does).

PLAIN (RFC 4616) is one message `[authzid] NUL authcid NUL passwd`, in the
initial response or after an empty `334 `. LOGIN (no RFC; the form every
client speaks) asks `Username:` then `Password:`; an initial response is
taken as the user name. A line `*` cancels (`501`, RFC 4954 section 4); a
line that is not base64 gets `501 5.5.2`; `=` as the initial response means
an empty one. Only the identity itself may be the authorization identity:
tlsfront has no notion of one user acting for another.

Client side (the outbound relay to a smarthost): `ClientAuth` picks PLAIN,
else LOGIN, from the mechanisms the server offered, gives the AUTH command
line and answers each `334` until a final reply, which it classifies as
`SUCCEEDED`, `REJECTED` (535 and other 5xx: a permanent failure) or
`TEMPFAIL` (4xx). Every line it produces is a `Secret`, since PLAIN's
initial response and LOGIN's second answer carry the password in base64.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Iterable
from dataclasses import dataclass, replace

from tlsfront.auth import replies
from tlsfront.auth.secret import Secret
from tlsfront.smtp.reply import Reply

MECHANISMS = ("PLAIN", "LOGIN")
# RFC 4954 section 4: a line of the exchange may be 12288 octets, CRLF included.
MAX_LINE = 12288
_USERNAME = Reply.make(334, base64.b64encode(b"Username:").decode())
_PASSWORD = Reply.make(334, base64.b64encode(b"Password:").decode())
_EMPTY = Reply.make(334, "")


@dataclass(frozen=True)
class Credentials:
    """What a client presented; the password shows as `<secret>`."""

    mechanism: str
    user: str
    password: Secret
    authzid: str = ""

    def wipe(self) -> None:
        self.password.wipe()


@dataclass(frozen=True)
class Challenge:
    reply: Reply


@dataclass(frozen=True)
class Refused:
    reply: Reply
    attempt: bool = False
    user: str | None = None  # when known, for the failure log
    mechanism: str = ""  # set when `attempt`, for the failure log


Step = Challenge | Credentials | Refused


def decode(line: bytes | str) -> bytes | None:
    """Strict base64 of one client line (without its CRLF); None if it is not."""
    if isinstance(line, str):
        line = line.encode("ascii", "replace")
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        return None


def _text(data: bytes) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text or any(c in text for c in "\0\r\n"):
        return None
    return text


class ServerAuth:
    """One AUTH command, from its argument to credentials or a refusal."""

    def __init__(self, argument: str, offered: Iterable[str] = MECHANISMS) -> None:
        self._offered = {m.upper() for m in offered}
        self._argument = argument
        self._mechanism = ""
        self._user: str | None = None
        self._done = False

    def start(self) -> Step:
        words = self._argument.split()
        if not words or len(words) > 2:
            return self._finish(Refused(replies.SYNTAX))
        self._mechanism = words[0].upper()
        if self._mechanism not in self._offered or self._mechanism not in MECHANISMS:
            return self._finish(Refused(replies.UNKNOWN_MECHANISM))
        if len(words) == 1:
            return _EMPTY_CHALLENGE if self._mechanism == "PLAIN" else Challenge(_USERNAME)
        return self._response(words[1], initial=True)

    def receive(self, line: bytes) -> Step:
        """One line from the client, with or without its CRLF."""
        if self._done:
            raise RuntimeError("the AUTH exchange is over")
        line = line.rstrip(b"\r\n")
        if len(line) + 2 > MAX_LINE:
            return self._finish(Refused(replies.LINE_TOO_LONG))
        if line == b"*":
            return self._finish(Refused(replies.CANCELLED))
        return self._response(line.decode("ascii", "replace"), initial=False)

    def _response(self, text: str, *, initial: bool) -> Step:
        data = b"" if initial and text == "=" else decode(text)
        if data is None:
            return self._finish(Refused(replies.BAD_BASE64))
        if self._mechanism == "PLAIN":
            return self._finish(self._plain(data))
        if self._user is None:
            self._user = _text(data)
            if self._user is None:
                return self._finish(Refused(replies.MALFORMED))
            return Challenge(_PASSWORD)
        if not data:
            return self._finish(Refused(replies.INVALID, attempt=True, user=self._user))
        return self._finish(Credentials("LOGIN", self._user, Secret(data)))

    def _plain(self, data: bytes) -> Step:
        parts = data.split(b"\0")
        if len(parts) != 3:
            return Refused(replies.MALFORMED)
        authzid = _text(parts[0]) if parts[0] else ""
        user = _text(parts[1])
        if authzid is None or user is None:
            return Refused(replies.MALFORMED)
        if not parts[2]:
            return Refused(replies.INVALID, attempt=True, user=user)
        if authzid and authzid != user:
            return Refused(replies.INVALID, attempt=True, user=user)
        return Credentials("PLAIN", user, Secret(parts[2]), authzid)

    def _finish(self, step: Step) -> Step:
        self._done = True
        if isinstance(step, Refused) and step.attempt:
            return replace(step, mechanism=self._mechanism)
        return step


_EMPTY_CHALLENGE = Challenge(_EMPTY)


def offered_mechanisms(ehlo_lines: Iterable[bytes | str]) -> list[str]:
    """The mechanisms of an EHLO reply's `AUTH` (or old `AUTH=`) lines."""
    found: list[str] = []
    for raw in ehlo_lines:
        line = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
        words = (
            line.replace("=", " ", 1).split() if line.upper().startswith("AUTH=") else line.split()
        )
        if not words or words[0].upper() != "AUTH":
            continue
        found.extend(w.upper() for w in words[1:] if w.upper() not in found)
    return found


class Outcome(enum.Enum):
    SUCCEEDED = "succeeded"
    REJECTED = "rejected"  # permanent: wrong credentials, or AUTH refused
    TEMPFAIL = "tempfail"


@dataclass(frozen=True)
class Finished:
    outcome: Outcome
    reply: Reply


class ClientAuth:
    """The client side of AUTH PLAIN or LOGIN against a server's replies."""

    def __init__(
        self, offered: Iterable[str], user: str, password: Secret, authzid: str = ""
    ) -> None:
        if "\0" in user + authzid or b"\0" in password.reveal():
            raise ValueError("a user name or password with NUL cannot be sent")
        offers = {m.upper() for m in offered}
        mechanism = next((m for m in MECHANISMS if m in offers), None)
        if mechanism is None:
            raise ValueError("the server offers neither PLAIN nor LOGIN")
        self.mechanism = mechanism
        self._user = user
        self._password = password
        self._authzid = authzid
        self._answers = 0

    def command(self) -> Secret:
        """The AUTH command line, CRLF included."""
        if self.mechanism == "PLAIN":
            message = b"\0".join(
                [self._authzid.encode(), self._user.encode(), self._password.reveal()]
            )
            return Secret(b"AUTH PLAIN " + base64.b64encode(message) + b"\r\n")
        return Secret(b"AUTH LOGIN\r\n")

    def receive(self, reply: Reply) -> Secret | Finished:
        """The server's reply: the next line to send, or the end."""
        if reply.code == 334 and self.mechanism == "LOGIN" and self._answers < 2:
            prompt = decode(reply.lines[-1]) or b""
            self._answers += 1
            if prompt.lower().startswith(b"pass") or (
                self._answers == 2 and not prompt.lower().startswith(b"user")
            ):
                return Secret(base64.b64encode(self._password.reveal()) + b"\r\n")
            return Secret(base64.b64encode(self._user.encode()) + b"\r\n")
        if reply.code == 334:
            # A challenge PLAIN or LOGIN never sends: cancel (RFC 4954's `*`).
            return Secret(b"*\r\n")
        if 200 <= reply.code < 300:
            return Finished(Outcome.SUCCEEDED, reply)
        if 400 <= reply.code < 500:
            return Finished(Outcome.TEMPFAIL, reply)
        return Finished(Outcome.REJECTED, reply)


__all__ = [
    "MAX_LINE",
    "MECHANISMS",
    "Challenge",
    "ClientAuth",
    "Credentials",
    "Finished",
    "Outcome",
    "Refused",
    "ServerAuth",
    "Step",
    "decode",
    "offered_mechanisms",
]
