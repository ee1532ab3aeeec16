"""The SASL exchanges of SMTP AUTH (PLAIN, LOGIN), server and client side."""

from __future__ import annotations

import base64
import pickle
import smtplib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlsfront.auth import replies
from tlsfront.auth.sasl import (
    Challenge,
    ClientAuth,
    Credentials,
    Finished,
    Outcome,
    Refused,
    ServerAuth,
    Step,
    offered_mechanisms,
)
from tlsfront.auth.secret import Secret
from tlsfront.smtp.reply import Reply


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def run(argument: str, *lines: bytes) -> list[Step]:
    exchange = ServerAuth(argument)
    steps = [exchange.start()]
    for line in lines:
        steps.append(exchange.receive(line))
    return steps


def creds_of(step: Step) -> tuple[str, str, bytes, str]:
    assert isinstance(step, Credentials), step
    return step.mechanism, step.user, step.password.reveal(), step.authzid


def test_plain_with_initial_response() -> None:
    [step] = run("PLAIN " + b64(b"\0alice\0wonderland"))
    assert creds_of(step) == ("PLAIN", "alice", b"wonderland", "")


def test_plain_after_an_empty_challenge() -> None:
    first, second = run("plain", (b64(b"alice\0alice\0wonderland") + "\r\n").encode())
    assert first == Challenge(Reply.make(334, ""))
    assert first.reply.raw == b"334 \r\n"
    assert creds_of(second) == ("PLAIN", "alice", b"wonderland", "alice")


def test_login_asks_user_then_password() -> None:
    steps = run("LOGIN", b64(b"alice").encode() + b"\r\n", b64(b"wonderland").encode())
    assert [s.reply.raw for s in steps[:2] if isinstance(s, Challenge)] == [
        b"334 VXNlcm5hbWU6\r\n",
        b"334 UGFzc3dvcmQ6\r\n",
    ]
    assert creds_of(steps[2]) == ("LOGIN", "alice", b"wonderland", "")


def test_login_with_the_user_name_as_initial_response() -> None:
    first, second = run("LOGIN " + b64(b"alice"), b64(b"wonderland").encode())
    assert first == Challenge(Reply.make(334, "UGFzc3dvcmQ6"))
    assert creds_of(second)[1:3] == ("alice", b"wonderland")


@pytest.mark.parametrize("argument", ["PLAIN", "LOGIN"])
def test_star_cancels(argument: str) -> None:
    steps = run(argument, b"*\r\n")
    assert steps[-1] == Refused(replies.CANCELLED)
    assert replies.CANCELLED.raw == b"501 5.7.0 Authentication cancelled\r\n"


@pytest.mark.parametrize(
    ("argument", "lines"),
    [("PLAIN !!!", ()), ("PLAIN", (b"not base64",)), ("LOGIN", (b"YWxpY2U",))],
)
def test_bad_base64(argument: str, lines: tuple[bytes, ...]) -> None:
    step = run(argument, *lines)[-1]
    assert step == Refused(replies.BAD_BASE64)
    assert step.reply.raw.startswith(b"501 5.5.2 ")


@pytest.mark.parametrize("argument", ["CRAM-MD5", "GSSAPI abc", "XOAUTH2 x"])
def test_unknown_mechanism(argument: str) -> None:
    assert run(argument) == [Refused(replies.UNKNOWN_MECHANISM)]
    assert replies.UNKNOWN_MECHANISM.raw.startswith(b"504 5.5.4 ")


def test_a_mechanism_not_offered_is_unknown() -> None:
    assert ServerAuth("LOGIN", offered=["PLAIN"]).start() == Refused(replies.UNKNOWN_MECHANISM)


@pytest.mark.parametrize("argument", ["", "PLAIN a b"])
def test_syntax(argument: str) -> None:
    assert run(argument) == [Refused(replies.SYNTAX)]


def test_another_authorization_identity_is_refused_and_counts() -> None:
    [step] = run("PLAIN " + b64(b"root\0alice\0wonderland"))
    assert step == Refused(replies.INVALID, attempt=True, user="alice", mechanism="PLAIN")


@pytest.mark.parametrize(
    "message", [b"", b"alice\0wonderland", b"\0\0pw", b"\0a\0b\0c", b"\0\xff\0pw", b"\0a\nb\0pw"]
)
def test_malformed_plain(message: bytes) -> None:
    argument = "PLAIN " + (b64(message) if message else "=")
    assert run(argument) == [Refused(replies.MALFORMED)]


def test_empty_passwords_fail_without_a_check() -> None:
    assert run("PLAIN " + b64(b"\0alice\0")) == [
        Refused(replies.INVALID, attempt=True, user="alice", mechanism="PLAIN")
    ]
    steps = run("LOGIN", b64(b"alice").encode(), b"")
    assert steps[-1] == Refused(replies.INVALID, attempt=True, user="alice", mechanism="LOGIN")


def test_overlong_lines() -> None:
    steps = run("PLAIN", b"A" * 20000)
    assert steps[-1] == Refused(replies.LINE_TOO_LONG)


def test_nothing_after_the_end() -> None:
    exchange = ServerAuth("PLAIN " + b64(b"\0alice\0wonderland"))
    exchange.start()
    with pytest.raises(RuntimeError):
        exchange.receive(b"*")


def test_replies_never_echo_the_client() -> None:
    texts = [v.raw for v in vars(replies).values() if isinstance(v, Reply)]
    assert len(texts) >= 13
    assert all(t.endswith(b"\r\n") and t.count(b"\r\n") == 1 for t in texts)


def test_the_password_never_shows() -> None:
    [step] = run("PLAIN " + b64(b"\0alice\0wonderland"))
    assert isinstance(step, Credentials)
    for text in (repr(step), str(step), f"{step}", f"{step.password!s:>20}", repr([step])):
        assert "wonderland" not in text
    assert "<secret>" in repr(step)
    with pytest.raises(TypeError):
        pickle.dumps(step)
    step.wipe()
    assert step.password.reveal() == b""


@given(st.binary(max_size=300))
def test_any_client_line_gives_a_step(data: bytes) -> None:
    for argument in ("PLAIN", "LOGIN"):
        exchange = ServerAuth(argument)
        exchange.start()
        step = exchange.receive(data.replace(b"\n", b""))
        assert isinstance(step, Challenge | Credentials | Refused)


@given(
    st.text(st.characters(blacklist_categories=["Cs", "Cc"]), min_size=1, max_size=40),
    st.binary(min_size=1, max_size=60).filter(lambda b: b"\0" not in b),
)
def test_client_and_server_agree(user: str, password: bytes) -> None:
    """What the client side builds, the server side reads back, both mechanisms."""
    for offered in (["PLAIN", "LOGIN"], ["LOGIN"]):
        client = ClientAuth(offered, user, Secret(password))
        command = client.command().reveal()
        assert command.startswith(b"AUTH ")
        assert command.endswith(b"\r\n")
        server = ServerAuth(command[5:-2].decode())
        step = server.start()
        while isinstance(step, Challenge):
            answer = client.receive(step.reply)
            assert isinstance(answer, Secret)
            step = server.receive(answer.reveal())
        assert creds_of(step) == (client.mechanism, user, password, "")
        assert client.receive(replies.SUCCEEDED) == Finished(Outcome.SUCCEEDED, replies.SUCCEEDED)


def test_client_prefers_plain_and_classifies_the_end() -> None:
    client = ClientAuth(["LOGIN", "PLAIN"], "alice", Secret(b"wonderland"))
    assert client.mechanism == "PLAIN"
    assert "wonderland" not in repr(client.command())
    bad = Reply.make(535, "5.7.8 Authentication credentials invalid")
    assert client.receive(bad) == Finished(Outcome.REJECTED, bad)
    temp = Reply.make(454, "4.7.0 Temporary authentication failure")
    assert client.receive(temp) == Finished(Outcome.TEMPFAIL, temp)


def test_client_cancels_an_unexpected_challenge() -> None:
    client = ClientAuth(["PLAIN"], "alice", Secret(b"wonderland"))
    client.command()
    answer = client.receive(Reply.make(334, "c29tZXRoaW5n"))
    assert isinstance(answer, Secret)
    assert answer.reveal() == b"*\r\n"


def test_client_without_a_usable_mechanism() -> None:
    with pytest.raises(ValueError, match="neither PLAIN nor LOGIN"):
        ClientAuth(["CRAM-MD5", "XOAUTH2"], "alice", Secret(b"x"))


def test_client_refuses_credentials_plain_cannot_carry() -> None:
    with pytest.raises(ValueError, match="NUL"):
        ClientAuth(["PLAIN"], "alice", Secret(b"wonder\0land"))
    with pytest.raises(ValueError, match="NUL"):
        ClientAuth(["LOGIN"], "al\0ice", Secret(b"wonderland"))


def test_offered_mechanisms_from_an_ehlo_reply() -> None:
    lines = [b"mx.example.org", b"PIPELINING", b"AUTH LOGIN PLAIN CRAM-MD5", b"AUTH=LOGIN"]
    assert offered_mechanisms(lines) == ["LOGIN", "PLAIN", "CRAM-MD5"]
    assert offered_mechanisms(["SIZE 100", "8BITMIME"]) == []
    assert offered_mechanisms(["AUTH=PLAIN LOGIN"]) == ["PLAIN", "LOGIN"]


class ExchangeSMTP(smtplib.SMTP):
    """smtplib's own AUTH code, talking to a ServerAuth instead of a socket."""

    def __init__(self) -> None:
        super().__init__()
        self.esmtp_features = {"auth": "PLAIN LOGIN"}
        self.does_esmtp = True
        self.ehlo_resp = b"ok"
        self.result: Step | None = None
        self._server: ServerAuth | None = None

    def docmd(self, cmd: str, args: str = "") -> tuple[int, bytes]:
        if cmd == "AUTH":
            self._server = ServerAuth(args)
            step = self._server.start()
        else:
            assert self._server is not None
            step = self._server.receive(cmd.encode())
        if isinstance(step, Challenge):
            return step.reply.code, step.reply.lines[0]
        self.result = step
        return (235, b"ok") if isinstance(step, Credentials) else (step.reply.code, b"no")


@pytest.mark.interop
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("initial", [True, False])
def test_smtplib_logins_are_understood(mechanism: str, initial: bool) -> None:
    client = ExchangeSMTP()
    client.user, client.password = "alice@example.org", "wonder land-7"
    method = client.auth_plain if mechanism == "PLAIN" else client.auth_login
    code, _ = client.auth(mechanism, method, initial_response_ok=initial)
    assert code == 235
    assert client.result is not None
    assert creds_of(client.result) == (
        mechanism,
        "alice@example.org",
        b"wonder land-7",
        "",
    )
