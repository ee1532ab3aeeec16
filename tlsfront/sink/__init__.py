"""The bundled sink: a small qmail-smtpd-compatible receiver delivering into a Maildir.

Theory of operation
-------------------
Like qmail-smtpd it serves exactly one SMTP session on stdin/stdout, started
per connection by whoever accepted it (tlsfront, tcpserver, inetd), and reads
the connection's facts from the UCSPI environment. Input is read with
``os.read`` into a bounded buffer; replies are buffered and written out just
before the next blocking read, which is what qmail's ``saferead`` does, so a
pipelined group of commands (RFC 2920) gets its replies in order and at once.

The DATA stream goes through :class:`DataDecoder`, a byte-level state machine
with qmail-smtpd's ``blast()`` semantics: CRLF becomes LF, a leading dot is
removed, ``CRLF . CRLF`` ends the message, and a bare LF anywhere aborts the
session with qmail's ``451 See http://pobox.com/~djb/docs/smtplf.html.``. The
stored text streams into a file under the Maildir's ``tmp/`` and is renamed into
``new/`` only after the final dot; every other ending (EOF, bare LF, size limit)
removes it, so nothing is delivered without the terminator.

A delivered file holds ``Return-Path: <sender>`` (as qmail-local writes it),
then qmail-smtpd's own Received line, then the message, with LF line endings.

Environment, as qmail-smtpd 1.03 reads it: ``TCPLOCALHOST`` (``TCPLOCALIP``,
``unknown``) is the ``by`` host of the Received line; ``TCPREMOTEIP``,
``TCPREMOTEHOST`` (``unknown`` when unset), ``TCPREMOTEINFO``; ``RELAYCLIENT``
(when set any recipient is accepted and the value is appended to it);
``DATABYTES`` (overrides ``--databytes``; 0 means no limit).

Where this differs from qmail-smtpd 1.03
----------------------------------------
- No control directory: ``--hostname`` stands for ``control/me`` and
  ``control/smtpgreeting``; without it the greeting name is ``TCPLOCALHOST``,
  then ``unknown``. ``--rcpthosts``/``--rcpthost`` stand for
  ``control/rcpthosts``; ``--databytes`` for ``control/databytes``; ``--timeout``
  for ``control/timeoutsmtpd``. No ``morercpthosts``, ``badmailfrom`` or
  ``localiphost``.
- A ``--rcpthosts`` file that is missing is an error (``421 unable to read
  controls``); qmail treats a missing ``rcpthosts`` as "accept everything".
  With neither option, every recipient is accepted, as qmail does without
  ``rcpthosts``.
- A command line longer than 64 KiB is refused with ``500 sorry, that line is
  too long (#5.5.2)`` and the session ends; qmail's buffer grows without bound.
- Messages go into a Maildir instead of the queue; ``qp`` in ``250 ok`` is this
  process's id. Unknown commands get ``502 unimplemented (#5.5.1)`` as in qmail
  1.03 (there is no ``500 unrecognised`` in qmail-smtpd).

Layout
------
``data`` holds the DATA decoder, ``envelope`` the address and rcpthosts rules,
``maildir`` the message store, ``control`` the options standing for the control
files, ``session`` the SMTP session itself; ``python -m tlsfront.sink`` runs
``__main__``. The names below are what the test and benchmark backends build on.
"""

from tlsfront.sink.control import (
    DEFAULT_TIMEOUT,
    Config,
    ControlError,
    build_parser,
    config_from_args,
    control_failure,
    read_rcpthosts,
)
from tlsfront.sink.data import DataDecoder, StrayNewline
from tlsfront.sink.envelope import parse_address, rcpthost_allowed
from tlsfront.sink.maildir import Delivery, Maildir, MessageStore, read_maildir
from tlsfront.sink.session import LINE_LIMIT, Envelope, SessionEnd, SinkSession

__all__ = [
    "DEFAULT_TIMEOUT",
    "LINE_LIMIT",
    "Config",
    "ControlError",
    "DataDecoder",
    "Delivery",
    "Envelope",
    "Maildir",
    "MessageStore",
    "SessionEnd",
    "SinkSession",
    "StrayNewline",
    "build_parser",
    "config_from_args",
    "control_failure",
    "parse_address",
    "rcpthost_allowed",
    "read_maildir",
    "read_rcpthosts",
]
