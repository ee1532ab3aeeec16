"""The backend's side of the SMTP dialogue: its replies and its failures.

Bytes from the backend are cut into replies (`ReplyReader`); each answers
the oldest command still waiting for the backend, or, unsolicited (a
timeout notice before it exits), is passed on as it is. Its EHLO reply is
rewritten before the client sees it (`advertised`): tlsfront drops what the
dialogue does not follow or a client could abuse, and adds what tlsfront
itself provides (AUTH, SIZE, STARTTLS).

A backend that dies, hangs or speaks nonsense never makes the client
believe a message was accepted: the first reply still owed becomes a 4xx
(the message lost, if it was a dot) and the session closes; during a body
the answer waits for the client's end of data (`tlsfront.smtp.message`).

These functions work on one `Dialogue`'s state and reply queue; they do no
I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tlsfront.auth import sasl
from tlsfront.smtp import replies
from tlsfront.smtp.errors import ProtocolError
from tlsfront.smtp.outcome import Ending, Outcome
from tlsfront.smtp.pending import Kind, Pending
from tlsfront.smtp.phases import BackendState, Phase
from tlsfront.smtp.reply import Reply, rewrite_ehlo

if TYPE_CHECKING:
    from tlsfront.smtp.dialogue import Dialogue

# Keywords tlsfront never passes on from the backend's EHLO reply: STARTTLS
# is tlsfront's own, and the others would let a client speak to the backend
# in a way this dialogue does not follow (BDAT chunks) or could abuse
# (XCLIENT/XFORWARD overwrite the client's identity at the backend).
DROPPED_KEYWORDS = frozenset({"STARTTLS", "CHUNKING", "BINARYMIME", "XCLIENT", "XFORWARD"})


def receive(d: Dialogue, data: bytes) -> None:
    """Bytes read from the backend; b"" when it closed its output."""
    if d.phase in (Phase.CLOSING, Phase.HANDSHAKE) or d._dropped is not None:
        return  # the old backend is being shut down; nothing it says counts
    if d.backend is BackendState.REFUSED:
        return  # it refused the session and is being shut down
    if not data:
        failed(d, Outcome.BACKEND_EXITED, "backend closed the connection")
        return
    try:
        found = d._replies.feed(data)
    except ProtocolError as exc:
        failed(d, Outcome.BACKEND_PROTOCOL, f"Backend failure: {exc.text}")
        return
    for reply in found:
        on_reply(d, reply)
        if d.closing:
            return
    if d._replies.failure is not None:
        failed(d, Outcome.BACKEND_PROTOCOL, f"Backend failure: {d._replies.failure.text}")
        return
    d._process_client()
    if d._client_eof and d.phase is Phase.BODY:
        # The client closed while DATA was pending and sent no end of data.
        d._close(Outcome.CLIENT_LOST, "client closed the connection during DATA")


def failed(d: Dialogue, outcome: Outcome, why: str) -> None:
    """The backend died, hung or spoke nonsense: 4xx to the client, never 250."""
    if d.phase in (Phase.CLOSING, Phase.HANDSHAKE) or d._backend_dead is not None:
        return
    if d.backend is BackendState.REFUSED:
        return  # its refusal stands; it is being shut down
    if d._dropped is not None:
        return  # its input was closed on purpose: a fresh one comes (RESET)
    d._backend_dead = Ending(outcome, why)
    d.backend_should_close = True
    d.stats.events.append(why)
    if d.stats.ending is None:
        d.stats.ending = d._backend_dead  # the cause, not the 4xx it becomes, for the log
    if d.phase is Phase.BODY:
        # The client is still sending the body and not reading: answer
        # at its end of data, which _process_body waits for.
        return
    for p in d._pending:
        if p.reply is None:
            if p.kind is Kind.DOT:
                p.reply = replies.message_lost()
                d.stats.refused += 1
            else:
                p.reply = replies.backend_gone(d.hostname, in_reply=True)
            p.close_after = True
            break
    else:
        if not d._pending:
            d._pending.append(
                Pending(
                    Kind.OTHER,
                    reply=replies.backend_gone(d.hostname, in_reply=False),
                    close_after=True,
                )
            )
    d._awaiting.clear()
    d._deliver()


def on_reply(d: Dialogue, reply: Reply) -> None:
    if not d._awaiting:
        # Unsolicited (a backend's timeout notice before it exits): the
        # backend's word, passed on as it is.
        d._to_client += reply.raw
        return
    entry = d._awaiting.pop(0)
    if entry.check:
        d._demand.checked(d, entry, reply)
        return
    if entry.kind is Kind.EHLO:
        reply = advertised(d, reply)
    entry.reply = reply
    d._deliver()


def advertised(d: Dialogue, reply: Reply) -> Reply:
    drop = set(DROPPED_KEYWORDS)
    if d._auth or (d.require_tls and not d.tls_active):
        drop.add("AUTH")  # tlsfront's own; no passwords in clear where TLS is required
    add = []
    if d._auth and d.tls_active:
        add.append("AUTH " + " ".join(sasl.MECHANISMS))
    if d._max_message_size:
        add.append(f"SIZE {d._max_message_size}")
    if d.tls_offered and not d.tls_active:
        add.append("STARTTLS")
    return rewrite_ehlo(reply, drop=drop, add=add)
