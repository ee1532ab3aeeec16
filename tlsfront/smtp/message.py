"""The message transfer of the SMTP dialogue: DATA's reply and the body.

Only the backend's `354` to DATA starts the body; any other reply with
client bytes already waiting behind DATA is a synchronization error, since
reading a body as commands would run it. In the body, `BodyScanner` finds
the one true end (CRLF.CRLF) and refuses bare CR, bare LF and NUL rather
than passing them to a lenient backend; tlsfront's Received header is
written to the backend before the body, with its first bytes (one write
to the backend where it would otherwise take two, since the client sends
the body only after the 354 has reached it).

A message over `max_message_size` is refused without ending the session:
the backend's input is closed at once without an end of data, the rest of
the body is read and dropped, and the client's end of data gets `552`
(then `Phase.RESET`, see `tlsfront.smtp.dialogue`). A backend that failed
during the body is answered at the client's end of data, with the message
lost.

These functions work on one `Dialogue`'s state and reply queue; they do no
I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tlsfront.smtp import replies, synchronization
from tlsfront.smtp.body import BodyScanner
from tlsfront.smtp.errors import RemoteProtocolError
from tlsfront.smtp.outcome import Outcome
from tlsfront.smtp.pending import Kind, Pending
from tlsfront.smtp.phases import Event
from tlsfront.smtp.reply import Reply

if TYPE_CHECKING:
    from tlsfront.smtp.dialogue import Dialogue


def after_data(d: Dialogue, reply: Reply) -> None:
    """The backend's reply to DATA: the body starts, or nothing may follow."""
    if reply.code == 354:
        d._move(Event.GO_AHEAD)
        d._body = BodyScanner(d._max_text_line, d._max_message_size)
        if d._received is not None:
            d._trace_header = d._received(d.stats.helo, d._esmtp)
        return
    d._move(Event.DATA_REFUSED)
    if d._client_buffer:
        # The client sent more behind DATA before knowing its fate: if
        # that was a body, reading it as commands would run it.
        d._client_buffer.clear()
        d._to_client += replies.synchronization_error().raw
        d._close(Outcome.PROTOCOL_ERROR, "pipelining after a refused DATA")


def process_body(d: Dialogue, data: bytes | None = None) -> None:
    """Scan `data`, or else what the client buffer holds, as body bytes."""
    body = d._body
    assert body is not None
    if data is None:
        data = bytes(d._client_buffer)
        d._client_buffer.clear()
    try:
        result = body.feed(data)
    except RemoteProtocolError as exc:
        d.stats.events.append(exc.text)
        if exc.code == 552 and d._dropped is None:
            # Too big: refused, but not a protocol error. The backend
            # gets no end of data; the rest of the body is dropped.
            d._dropped = replies.of_error(exc)
            d.backend_should_close = True
            result = body.feed(b"")
        else:
            d.stats.refused += 1
            d._to_client += exc.reply
            d._close(Outcome.PROTOCOL_ERROR, exc.text)
            return
    d.stats.body_bytes += len(result.forward)
    if d._backend_dead is None and (result.forward or result.done):
        if d._trace_header:
            d._send_backend(d._trace_header)
            d._trace_header = b""
        d._send_backend(result.forward)
    if not result.done:
        return
    d._body = None
    d._move(Event.BODY_END)
    d._client_buffer += result.rest
    why = d._sync.command(
        ".", followed=bool(d._client_buffer), owed=synchronization.owed(d), trusted=d.trusted
    )
    if why is not None:  # the dot is answered; what was pipelined behind it is not
        synchronization.out_of_sync(d, why, d._client_buffer)
    if d._dropped is not None:  # answered now; a fresh backend next (RESET)
        dot = Pending(Kind.DOT, reply=d._dropped, reset_after=why is None)
        d._pending.append(dot)
    elif d._backend_dead is not None:
        d.stats.refused += 1
        d._to_client += replies.message_lost().raw
        d._close(d._backend_dead.outcome, d._backend_dead.text)
        return
    else:
        dot = Pending(Kind.DOT)
        d._pending.append(dot)
        d._awaiting.append(dot)
    if why is not None:
        d._answer(Pending(Kind.OTHER, desync=True), replies.synchronization_error(), close=True)
    if d._dropped is not None:
        d._deliver()
