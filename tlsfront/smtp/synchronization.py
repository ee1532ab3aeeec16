"""SMTP command synchronization: which client input is pipelined too far.

Theory of operation
-------------------
RFC 2920 lets a client that was offered PIPELINING (an EHLO reply) send a
group of commands without waiting for each reply, but `DATA`, `BDAT` and
`QUIT` end a group: the client must wait for their reply before it sends
anything more, and the message content waits for the `354`. A client that
said `HELO` was offered no PIPELINING at all and must wait for every reply.
Input that breaks these rules is how smuggling and desynchronization
attacks are delivered; no real mail program sends it. On a session that is
neither authenticated nor granted relaying by its certificate (`trusted`),
and unless the profile relaxes it (``pipelining_strict = false``), such
input gets ``554 5.5.0 Error: SMTP protocol synchronization`` and the
session ends, as with Postfix's ``smtpd_forbid_unauth_pipelining``.

The dialogue is sans-I/O and sees no packets, so "sent without waiting" is
defined by what it holds and when:

* a command line is *followed* when client bytes are already in the
  dialogue's buffer behind its line break at the moment the line is taken,
  whether they came in the same `receive_client` call or an earlier one;
* bytes *arrive early* when a `receive_client` call brings them while a
  reply is still owed, that is, before the dialogue has put the reply into
  its client outbox (the client cannot have read it).

A violation is then:

1. a `DATA`, `BDAT` or `QUIT` line that is followed, or bytes that arrive
   early while the reply to one of these is owed: content before the `354`
   is such bytes;
2. from a client whose last greeting command was `HELO`: any command line
   (the end of a message, the dot, included) that is followed, or taken
   while a reply to an earlier command is owed, or bytes that arrive early.

Bytes read in the message body are the body: they are not checked. Bytes
behind `STARTTLS` are thrown away, as before, not refused.

`Discipline` holds the rule's state for one dialogue and answers whether an
event breaks it; the dialogue sends the reply and ends the session.

`Discipline` holds the rules; `owed`, `arrived_early` and `out_of_sync`
apply them to one `Dialogue`'s reply queue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tlsfront.smtp import replies
from tlsfront.smtp.outcome import Ending, Outcome
from tlsfront.smtp.pending import Kind, Pending

if TYPE_CHECKING:
    from tlsfront.smtp.dialogue import Dialogue

# The commands that end a pipelined group (RFC 2920 §3; BDAT: RFC 3030).
GROUP_ENDERS = frozenset({"DATA", "BDAT", "QUIT"})


class Discipline:
    """Whether client input breaks command synchronization (see module doc)."""

    def __init__(self, *, strict: bool = True) -> None:
        self.strict = strict
        self.helo_client = False  # the last greeting command was HELO

    def command(
        self, verb: str, *, followed: bool, owed: bool, trusted: bool = False
    ) -> str | None:
        """A command line taken (`verb` "." for the end of a message).

        `followed`: bytes wait behind it; `owed`: a reply to an earlier
        command is still owed; `trusted`: the client is logged in, or relays
        by its certificate (the rule is not enforced on it). Returns why it
        breaks the rule, or None.
        """
        if verb == "HELO":
            self.helo_client = True
        elif verb == "EHLO":
            self.helo_client = False
        if trusted or not self.strict:
            return None
        if followed and verb in GROUP_ENDERS:
            return f"improper command pipelining after {verb}"
        if self.helo_client and (followed or owed):
            name = "end of data" if verb == "." else verb
            return f"improper command pipelining after {name} by a HELO client"
        return None

    def arrival(self, *, ender: str | None, owed: bool, trusted: bool = False) -> str | None:
        """Client bytes received outside the body.

        `ender`: the group-ending command whose reply is still owed, if any;
        `owed`: any reply is still owed. Returns why it breaks the rule.
        """
        if trusted or not self.strict:
            return None
        if ender is not None:
            return f"improper command pipelining after {ender}"
        if self.helo_client and owed:
            return "improper command pipelining by a HELO client"
        return None


__all__ = ["GROUP_ENDERS", "Discipline"]


def owed(d: Dialogue) -> bool:
    """A reply to the client is still owed (not a swallowed one of a fresh backend)."""
    return any(not p.swallow for p in d._pending)


def arrived_early(d: Dialogue, data: bytes) -> bool:
    """Client bytes outside the body: refused if a reply they should await is owed."""
    if not owed(d):
        return False
    ender = verb = None
    for p in d._pending:
        if p.command is not None and p.command.verb in GROUP_ENDERS:
            ender, verb = p, p.command.verb
            break
    why = d._sync.arrival(ender=verb, owed=True, trusted=d.trusted)
    if why is None:
        return False
    out_of_sync(d, why, d._client_buffer + data)
    if ender is not None:
        ender.desync = ender.close_after = True  # its reply, when it comes, is replaced
    else:
        d._answer(Pending(Kind.OTHER, desync=True), replies.synchronization_error(), close=True)
    d._deliver()
    return True


def out_of_sync(d: Dialogue, why: str, input: bytes | bytearray) -> None:
    """Record a synchronization error; nothing more the client sent is read."""
    d._desync = True
    d.stats.events.append(f"{why}: {bytes(input[:40])!r}")
    d._client_buffer.clear()
    if d.stats.ending is None:
        d.stats.ending = Ending(Outcome.PIPELINING, why)
