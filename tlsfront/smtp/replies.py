"""Every reply tlsfront writes itself, in both directions, each written once.

Replies of the backend and of remote servers are passed on as they came;
these are tlsfront's own words. Most copy Postfix's (`Error: ...`) or
qmail's wording where a client may already know them. Errors that the
protocol layer raises (`ProtocolError`) carry their reply; the factories for
them are here too, so that a code, its enhanced status code and its text
appear in one place only.

The test-only backend (`tlsfront.sink`) keeps its own words: it imitates
qmail-smtpd, not tlsfront.
"""

from __future__ import annotations

from tlsfront.smtp.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from tlsfront.smtp.reply import Reply


def _reply(code: int, status: str, text: str) -> Reply:
    return Reply.make(code, f"{status} {text}")


def of_error(error: ProtocolError) -> Reply:
    """The reply an error carries."""
    return _reply(error.code, error.status, error.text)


# --------------------------------------------- errors of the client's input


def line_too_long() -> RemoteProtocolError:
    return RemoteProtocolError(500, "5.5.2", "Error: line too long")


def bad_characters() -> RemoteProtocolError:
    return RemoteProtocolError(500, "5.5.2", "Error: bare CR, bare LF or NUL in command line")


def bad_path(why: str) -> RemoteProtocolError:
    """A MAIL FROM or RCPT TO argument that is not `<address>`."""
    return RemoteProtocolError(501, "5.5.4", why)


def bad_body() -> RemoteProtocolError:
    return RemoteProtocolError(
        550, "5.5.2", "Error: bare CR, bare LF or NUL in message, message refused"
    )


def body_line_too_long() -> RemoteProtocolError:
    return RemoteProtocolError(500, "5.5.2", "Error: message line too long")


def message_too_big() -> RemoteProtocolError:
    return RemoteProtocolError(552, "5.3.4", "Error: message too big")


def bad_reply(why: str) -> RemoteProtocolError:
    """A backend or remote server whose replies break the protocol."""
    return RemoteProtocolError(421, "4.3.0", why)


def starttls_not_pending() -> LocalProtocolError:
    return LocalProtocolError(503, "5.5.1", "STARTTLS is not pending")


def no_backend_wanted() -> LocalProtocolError:
    """The shell started a backend that the dialogue did not ask for."""
    return LocalProtocolError(503, "5.5.1", "no backend was wanted")


def illegal_move(phase: str, event: str) -> LocalProtocolError:
    """The dialogue asked for a phase change its table does not have."""
    return LocalProtocolError(503, "5.5.1", f"no move on {event} in phase {phase}")


# ------------------------------------------- the inbound side, to the client


def refused_connection(hostname: str, why: str) -> Reply:
    """A connection refused before any backend (limits, rules)."""
    return _reply(421, "4.7.0", f"{hostname} Error: {why}")


def backend_unavailable(hostname: str) -> Reply:
    """No backend could be started for the session."""
    return _reply(421, "4.3.0", f"{hostname} Service temporarily unavailable")


def ok() -> Reply:
    """NOOP and RSET while no backend runs (no transaction exists without one)."""
    return _reply(250, "2.0.0", "Ok")


def closing(hostname: str) -> Reply:
    """QUIT while no backend runs."""
    return _reply(221, "2.0.0", f"{hostname} closing connection")


def backend_gone(hostname: str, *, in_reply: bool) -> Reply:
    """The backend failed: as the reply to a command, or when none was owed."""
    if in_reply:
        return _reply(421, "4.3.0", f"{hostname} Service not available, closing channel")
    return _reply(421, "4.3.0", f"{hostname} Service not available")


def message_lost() -> Reply:
    return _reply(451, "4.3.0", "Error: backend failed, message not accepted")


def client_timeout(hostname: str) -> Reply:
    return _reply(421, "4.4.2", f"{hostname} Error: timeout exceeded")


def shutting_down(hostname: str) -> Reply:
    return _reply(421, "4.3.2", f"{hostname} Service shutting down")


def ready_for_tls() -> Reply:
    return _reply(220, "2.0.0", "Ready to start TLS")


TLS_UNAVAILABLE = "TLS not available due to local problem"


def tls_unavailable(text: str = TLS_UNAVAILABLE) -> Reply:
    return _reply(454, "4.7.0", text)


def synchronization_error() -> Reply:
    """Input pipelined where RFC 2920 forbids it (tlsfront.smtp.synchronization)."""
    return _reply(554, "5.5.0", "Error: SMTP protocol synchronization")


def starttls_first() -> Reply:
    return _reply(530, "5.7.0", "Must issue a STARTTLS command first")


def not_implemented() -> Reply:
    return _reply(502, "5.5.1", "Error: command not implemented")


def size_exceeded() -> Reply:
    return _reply(552, "5.3.4", "Error: message size exceeds fixed limit")


def starttls_syntax() -> Reply:
    return _reply(501, "5.5.4", "Syntax: STARTTLS")


def tls_already_active() -> Reply:
    return _reply(554, "5.5.1", "Error: TLS already active")


# ------------------------------------ the outbound relay, to qmail-remote


def relay_greeting(name: str) -> Reply:
    return Reply.make(220, f"{name} ESMTP tlsfront outbound relay")


def relay_hello(name: str) -> Reply:
    return Reply.make(250, name)


def relay_ok() -> Reply:
    return _reply(250, "2.0.0", "ok")


def relay_sender_ok() -> Reply:
    return _reply(250, "2.1.0", "sender ok")


def relay_vrfy() -> Reply:
    return _reply(252, "2.5.0", "send some mail, I'll try my best")


def relay_bye(name: str) -> Reply:
    return _reply(221, "2.0.0", f"{name} closing connection")


def relay_not_implemented() -> Reply:
    return _reply(502, "5.5.1", "command not implemented")


def relay_not_permitted() -> Reply:
    return _reply(554, "5.7.1", "relaying not permitted from this address")


def relay_timeout() -> Reply:
    return _reply(421, "4.4.2", "timeout, closing connection")


def relay_nested_mail() -> Reply:
    return _reply(503, "5.5.1", "nested MAIL command")


def relay_mail_first() -> Reply:
    return _reply(503, "5.5.1", "MAIL first")


def relay_no_domain() -> Reply:
    return _reply(501, "5.1.3", "recipient address has no domain")


def relay_one_domain() -> Reply:
    return _reply(451, "4.5.3", "one destination domain per transaction, try again later")


def relay_no_recipients() -> Reply:
    return _reply(554, "5.5.1", "no valid recipients")


def relay_synchronization_error() -> Reply:
    """A body sent before the 354 it needed, behind a refused DATA."""
    return _reply(421, "4.5.0", "SMTP protocol synchronization error")


def relay_body_refused(error: ProtocolError) -> Reply:
    """A body the shared body rules refuse: no final dot goes to the remote server."""
    return _reply(554, "5.6.0", error.text)


def relay_remote_broken(where: str, why: str) -> Reply:
    """The remote session broke after it was opened."""
    return _reply(451, "4.4.2", f"{where}: {why}")


def relay_no_such_domain(why: str) -> Reply:
    return _reply(550, "5.1.2", why)


def relay_dns_failed(why: str) -> Reply:
    return _reply(451, "4.4.3", why)


def relay_tls_policy_not_met(why: str) -> Reply:
    return _reply(451, "4.7.5", f"TLS policy not met: {why}")


def relay_unreachable(why: str) -> Reply:
    return _reply(451, "4.4.0", f"no remote host reachable: {why}")


def relay_credentials_unreadable() -> Reply:
    """The route credentials files have never been read (the log says why)."""
    return _reply(451, "4.3.0", "route credentials cannot be read, see the log")


def relay_login_refused(where: str, user: str, said: str) -> Reply:
    """The smarthost refused the login (5xx): permanent, so qmail bounces with its words."""
    return _reply(554, "5.7.8", f"{where} refused the login as {user}: {said}")


def relay_login_failed(where: str, user: str, said: str) -> Reply:
    """The smarthost could not check the login now (4xx): qmail retries."""
    return _reply(451, "4.7.0", f"{where}: login as {user} failed for now: {said}")


def relay_login_impossible(where: str, user: str, why: str) -> Reply:
    """No mechanism both sides speak: a configuration matter, the mail waits."""
    return _reply(451, "4.7.0", f"{where}: cannot log in as {user}: {why}")
