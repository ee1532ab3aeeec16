"""The DATA stream: qmail-smtpd's ``blast()`` as a sans-I/O decoder.

CRLF becomes LF, a leading dot is removed, ``CRLF . CRLF`` ends the message,
and a bare LF anywhere raises :class:`StrayNewline`. While the header lasts,
the decoder counts its ``Received``/``Delivered`` lines (the hop count).
"""

from __future__ import annotations

import re


class StrayNewline(Exception):
    """A bare LF in the DATA stream; ``consumed`` counts the bytes up to and with it."""

    def __init__(self, consumed: int) -> None:
        super().__init__("bare LF in DATA")
        self.consumed = consumed


_MID, _LINE_START, _DOT, _DOT_CR, _CR = range(5)
_CR_OR_LF = re.compile(rb"[\r\n]")
_HOP_PREFIXES = (b"received", b"delivered")


class DataDecoder:
    """qmail-smtpd's DATA semantics as a sans-I/O machine.

    ``feed(data)`` returns ``(text, consumed, done)``: the stored text made from
    the bytes it consumed, how many bytes of ``data`` it consumed, and whether
    the final dot was among them (bytes after it are left for the caller).
    ``hops`` counts header lines starting with ``Received``/``Delivered``.
    """

    def __init__(self) -> None:
        self._state = _LINE_START
        self.hops = 0
        self._in_header = True
        self._prefix = bytearray()

    def feed(self, data: bytes) -> tuple[bytes, int, bool]:
        out = bytearray()
        state = self._state
        i, n = 0, len(data)
        done = False
        while i < n:
            if state == _MID:
                m = _CR_OR_LF.search(data, i)
                j = n if m is None else m.start()
                if j > i:
                    out += data[i:j]
                    i = j
                    continue
            ch = data[i]
            i += 1
            if ch == 0x0A and state in (_MID, _LINE_START, _DOT):
                raise StrayNewline(i)
            if state == _MID:  # ch is CR
                state = _CR
            elif state == _LINE_START:
                if ch == 0x2E:
                    state = _DOT
                elif ch == 0x0D:
                    state = _CR
                else:
                    out.append(ch)
                    state = _MID
            elif state == _DOT:  # the leading dot is dropped
                if ch == 0x0D:
                    state = _DOT_CR
                else:
                    out.append(ch)
                    state = _MID
            elif state == _DOT_CR:
                if ch == 0x0A:
                    done = True
                    break
                out += b".\r"
                if ch == 0x0D:
                    state = _CR
                else:
                    out.append(ch)
                    state = _MID
            else:  # _CR: a CR is pending
                if ch == 0x0A:
                    out.append(0x0A)
                    state = _LINE_START
                elif ch == 0x0D:
                    out.append(0x0D)
                else:
                    out += bytes((0x0D, ch))
                    state = _MID
        self._state = state
        text = bytes(out)
        self._count_hops(text)
        return text, i, done

    def _count_hops(self, text: bytes) -> None:
        pos = 0
        while self._in_header and pos < len(text):
            nl = text.find(b"\n", pos)
            end = len(text) if nl < 0 else nl
            room = 9 - len(self._prefix)
            if room > 0:
                self._prefix += text[pos : min(end, pos + room)]
            if nl < 0:
                return
            if not self._prefix:
                self._in_header = False  # the empty line ends the header
            elif bytes(self._prefix).lower().startswith(_HOP_PREFIXES):
                self.hops += 1
            self._prefix.clear()
            pos = nl + 1
