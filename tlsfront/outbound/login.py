"""Logging in to a smarthost (SMTP AUTH, RFC 4954) on an open remote session.

The dialer calls `log_in` after STARTTLS and the second EHLO, and only when
the session's TLS was verified or pinned for that host (the route's policy
is at least `verify`, see `policy.with_credentials`). The exchange itself is
`tlsfront.auth.sasl.ClientAuth` (PLAIN, else LOGIN, as the server offers);
this module moves its lines, every one a `Secret`, and turns the end into
what qmail-remote must hear:

* success: nothing (the dialer goes on with MAIL FROM);
* a 5xx (`535 5.7.8` and the like): a permanent failure, `554 5.7.8` with
  the server's own words, so qmail bounces the message with a clear text;
* a 4xx (`454 4.7.0`): a temporary one, `451 4.7.0`, so qmail retries;
* no PLAIN or LOGIN offered after TLS: `451 4.7.0` (a configuration matter
  to fix while the mail waits in the queue).

No other host or address is tried after the server has answered AUTH:
credentials refused by one address of a smarthost are refused by the next,
and trying them all would only count more failures against the account.
"""

from __future__ import annotations

import logging

from tlsfront.auth.sasl import ClientAuth, Finished, Outcome, offered_mechanisms
from tlsfront.outbound import stats
from tlsfront.outbound.client import RemoteError, SmtpClient
from tlsfront.outbound.credentials import Login
from tlsfront.smtp import replies
from tlsfront.smtp.reply import Reply

log = logging.getLogger("tlsfront.outbound")

# PLAIN takes one round, LOGIN three; a server that keeps challenging is broken.
MAX_ROUNDS = 4


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


async def log_in(client: SmtpClient, login: Login, domain: str, where: str) -> Reply | None:
    """AUTH on `client`; None when logged in, else the reply for qmail-remote.

    Raises RemoteError when the connection breaks during the exchange.
    """
    user = _printable(login.user)
    ehlo = client.ehlo
    ehlo_lines = ehlo.lines[1:] if ehlo is not None and ehlo.code == 250 else ()
    try:
        auth = ClientAuth(offered_mechanisms(ehlo_lines), login.user, login.password)
    except ValueError as err:
        stats.record_login("unavailable", "-")
        log.warning("outbound domain=%s mx=%s login as %s impossible: %s", domain, where, user, err)
        return replies.relay_login_impossible(where, user, str(err))
    line = auth.command()
    for _ in range(MAX_ROUNDS):
        await client.send(line.reveal())
        reply = await client.read_reply()
        step = auth.receive(reply)
        if isinstance(step, Finished):
            return _finished(step, auth.mechanism, user, domain, where, reply)
        line = step
    raise RemoteError("the AUTH exchange does not end")


def _finished(
    step: Finished, mechanism: str, user: str, domain: str, where: str, reply: Reply
) -> Reply | None:
    stats.record_login(step.outcome.value, mechanism)
    said = reply.first_line
    if step.outcome is Outcome.SUCCEEDED:
        log.info(
            "outbound domain=%s mx=%s logged in as %s mechanism=%s", domain, where, user, mechanism
        )
        return None
    log.warning(
        "outbound domain=%s mx=%s login as %s mechanism=%s %s: %r",
        domain,
        where,
        user,
        mechanism,
        "refused" if step.outcome is Outcome.REJECTED else "failed temporarily",
        said,
    )
    if step.outcome is Outcome.REJECTED:
        return replies.relay_login_refused(where, user, said)
    return replies.relay_login_failed(where, user, said)


__all__ = ["log_in"]
