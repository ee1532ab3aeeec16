"""tlsfront's own STARTTLS (RFC 3207), inside the SMTP dialogue.

STARTTLS is never passed to the backend. Accepted, it throws away every
byte pipelined behind it (a client must wait for the 220; anything sent
before would be read as if it came over TLS), waits until every reply owed
before it has gone out, then sets `phase` to `STARTTLS_READY`. The shell
answers `220` through `Dialogue.starttls_accept` (or `454` through
`starttls_refuse` when TLS cannot be had) and does the handshake. On a port
that requires TLS, only `ALLOWED_BEFORE_TLS` may come before it.

These functions work on one `Dialogue`'s state and reply queue; they do no
I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tlsfront.smtp import replies
from tlsfront.smtp.command import Command
from tlsfront.smtp.pending import Kind, Pending
from tlsfront.smtp.phases import Event, Phase

if TYPE_CHECKING:
    from tlsfront.smtp.dialogue import Dialogue

# What a client may do before TLS on a port that requires it (RFC 3207 §4).
ALLOWED_BEFORE_TLS = frozenset({"EHLO", "HELO", "STARTTLS", "NOOP", "RSET", "QUIT"})


def starttls_read(d: Dialogue, entry: Pending, command: Command) -> None:
    if command.args:
        d._answer(entry, replies.starttls_syntax())
    elif d.tls_active:
        d._answer(entry, replies.tls_already_active())
    elif not d.tls_offered:
        d._answer(entry, replies.not_implemented())
    else:
        entry.kind = Kind.STARTTLS
        d._pending.append(entry)
        discarded = len(d._client_buffer)
        if discarded:
            d.stats.discarded_after_starttls += discarded
            d.stats.events.append(f"discarded {discarded} bytes pipelined after STARTTLS")
        d._client_buffer.clear()
        d._move(Event.STARTTLS_READ)


def accept(d: Dialogue) -> None:
    """Answer 220; the shell then sends it and does the handshake."""
    if d.phase is not Phase.STARTTLS_READY:
        raise replies.starttls_not_pending()
    d._pending.pop(0)
    d._to_client += replies.ready_for_tls().raw
    d._move(Event.TLS_ACCEPTED)
    d.backend_should_close = True


def refuse(d: Dialogue, text: str = replies.TLS_UNAVAILABLE) -> None:
    """TLS cannot be had now (no certificate, a rate limit): 454, go on."""
    if d.phase is not Phase.STARTTLS_READY:
        raise replies.starttls_not_pending()
    d._pending.pop(0)
    d._to_client += replies.tls_unavailable(text).raw
    d._move(Event.TLS_REFUSED)
