"""tlsfront's own AUTH in the dialogue alone: every input also fed byte by byte."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from test_ondemand_dialogue import EHLO_REPLY, FACE, GREETING
from test_smtp_dialogue import Harness

from tlsfront.auth import replies
from tlsfront.auth.sasl import Credentials, Refused
from tlsfront.smtp import Phase


@pytest.fixture(params=["whole", "bytewise"])
def bytewise(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "bytewise")


def make(bytewise: bool, **kwargs: Any) -> Harness:
    options: dict[str, Any] = {"face": FACE, "auth": True, "tls_active": True, "greet": False}
    options.update(kwargs)
    h = Harness(bytewise, **options)
    h.take()
    return h


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def test_auth_offered_only_inside_tls(bytewise: bool) -> None:
    plain = make(bytewise, tls_active=False)
    plain.client(b"EHLO c\r\nAUTH PLAIN\r\n")
    client, _ = plain.take()
    assert b"AUTH" not in client.split(b"\r\n530")[0]
    assert client.endswith(b"530 5.7.0 Must issue a STARTTLS command first\r\n")
    tls = make(bytewise)
    tls.client(b"EHLO c\r\n")
    assert b"250-AUTH PLAIN LOGIN\r\n" in tls.take()[0]


def test_login_exchange_then_the_shells_verdict(bytewise: bool) -> None:
    h = make(bytewise)
    h.client(b"AUTH LOGIN\r\n")
    assert h.take() == (b"334 VXNlcm5hbWU6\r\n", b"")
    assert h.d.phase is Phase.AUTH
    h.client(b64("alice") + b"\r\n")
    assert h.take() == (b"334 UGFzc3dvcmQ6\r\n", b"")
    h.client(b64("wonderland") + b"\r\nMAIL FROM:<a@b>\r\n")
    step = h.d.auth_due
    assert isinstance(step, Credentials)
    assert (step.user, step.password.reveal()) == ("alice", b"wonderland")
    assert not h.d.client_wants_data  # the line behind it waits for the verdict
    h.d.auth_concluded(replies.SUCCEEDED, "alice", False)
    client, _ = h.take()
    assert client == b"235 2.7.0 Authentication successful\r\n"
    assert h.d.auth_user == "alice"
    assert h.d.backend_wanted  # the MAIL behind it: the backend now, with the login known


def test_cancel_and_bad_base64_go_to_the_shell_as_refusals(bytewise: bool) -> None:
    h = make(bytewise)
    h.client(b"AUTH PLAIN\r\n")
    assert h.take()[0] == b"334 \r\n"
    h.client(b"*\r\n")
    step = h.d.auth_due
    assert isinstance(step, Refused)
    assert step.reply == replies.CANCELLED
    h.d.auth_concluded(step.reply, None, False)
    assert h.take()[0] == b"501 5.7.0 Authentication cancelled\r\n"
    assert h.d.phase is Phase.COMMAND


def test_a_failure_too_many_closes(bytewise: bool) -> None:
    h = make(bytewise)
    h.client(b"AUTH PLAIN " + b64("\0alice\0wrong") + b"\r\n")
    assert isinstance(h.d.auth_due, Credentials)
    h.d.auth_concluded(replies.INVALID, None, True)
    assert h.take()[0] == (
        b"535 5.7.8 Authentication credentials invalid\r\n"
        b"421 4.7.0 Too many failed authentication attempts\r\n"
    )
    assert h.d.closing


def test_second_auth_and_auth_in_a_transaction_get_503(bytewise: bool) -> None:
    h = make(bytewise)
    h.client(b"EHLO c\r\nMAIL FROM:<a@b>\r\n")
    h.d.backend_started()
    h.backend(GREETING + EHLO_REPLY + b"250 ok\r\n")
    h.take()
    h.client(b"AUTH PLAIN\r\n")
    assert h.take() == (b"503 5.5.1 AUTH not permitted during a mail transaction\r\n", b"")
    h.client(b"RSET\r\n")
    h.backend(b"250 flushed\r\n")
    h.take()
    h.client(b"AUTH PLAIN " + b64("\0alice\0wonderland") + b"\r\n")
    h.d.auth_concluded(replies.SUCCEEDED, "alice", False)
    assert h.take()[0] == b"235 2.7.0 Authentication successful\r\n"
    # a backend from before the login runs: a fresh one comes (RESET), the login carried
    assert h.d.phase is Phase.RESET
    assert h.d.backend_should_close
    assert h.d.carry().auth_user == "alice"


def test_require_auth(bytewise: bool) -> None:
    h = make(bytewise, require_auth=True)
    h.client(b"MAIL FROM:<a@b>\r\n")
    assert h.take() == (b"530 5.7.0 Authentication required\r\n", b"")
    certified = make(bytewise, require_auth=True, authorized=True)
    certified.client(b"MAIL FROM:<a@b>\r\n")
    assert certified.d.backend_wanted  # a relaying certificate counts


def test_without_a_verifier_auth_is_the_backends(bytewise: bool) -> None:
    h = make(bytewise, auth=False)
    h.client(b"AUTH PLAIN\r\n")
    assert h.d.backend_wanted
