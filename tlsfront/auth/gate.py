"""One session's AUTH from the completed exchange to the reply (trio).

The session drives the exchange (`sasl.ServerAuth`: send each `Challenge`,
feed back each line) and hands the final step to `AuthGate.conclude`, which
asks the verifier, wipes the credentials, logs and counts the outcome, makes
a failing client wait, and says what to answer:

    gate = AuthGate(verifier, SessionThrottle(limiter, ip, ...), env)
    if not gate.may_try():                 -> 421 4.7.0, close
    step = ServerAuth(argument).start() ... until not a Challenge
    decision = await gate.conclude(step)   -> decision.reply; user; close

A temporary failure of the verifier is logged with its cause but costs the
client nothing; a refused exchange costs only when it was a login attempt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio

from tlsfront.auth import replies
from tlsfront.auth.sasl import Credentials, Refused
from tlsfront.auth.throttle import SessionThrottle, clean_user, log_failure
from tlsfront.auth.verifier import Verdict, Verifier
from tlsfront.smtp.reply import Reply

log = logging.getLogger("tlsfront")
# Called with (mechanism, verifier name, "good" | "bad" | "tempfail") for metrics.
ResultHook = Callable[[str, str, str], None]


@dataclass(frozen=True)
class Decision:
    """Send `reply`; when `close`, then send `replies.TOO_MANY_FAILURES` and close."""

    reply: Reply
    user: str | None = None  # set only after a successful login
    close: bool = False


class AuthGate:
    def __init__(
        self,
        verifier: Verifier,
        throttle: SessionThrottle,
        env: Mapping[str, str],
        *,
        on_result: ResultHook | None = None,
    ) -> None:
        self.verifier = verifier
        self.throttle = throttle
        self.env = env
        self.on_result = on_result

    def may_try(self) -> bool:
        return self.throttle.may_try(trio.current_time())

    async def conclude(self, step: Credentials | Refused) -> Decision:
        if isinstance(step, Refused):
            if not step.attempt:
                return Decision(step.reply)
            return await self._failed(step.user, step.mechanism, step.reply)
        try:
            result = await self.verifier.verify(step, self.env)
        finally:
            step.wipe()
        self._count(step.mechanism, result.verdict.value)
        if result.verdict is Verdict.GOOD:
            return Decision(replies.SUCCEEDED, user=result.user)
        if result.verdict is Verdict.TEMPFAIL:
            log.warning(
                "AUTH tempfail: client=%s user=%s mechanism=%s verifier=%s: %s",
                self.throttle.ip,
                clean_user(step.user),
                step.mechanism,
                self.verifier.name,
                result.detail,
            )
            return Decision(replies.TEMPFAIL)
        return await self._failed(step.user, step.mechanism, replies.INVALID)

    async def _failed(self, user: str | None, mechanism: str, reply: Reply) -> Decision:
        log_failure(self.throttle.ip, user, mechanism, self.verifier.name)
        penalty = self.throttle.failed(trio.current_time())
        await trio.sleep(penalty.delay)
        return Decision(reply, close=penalty.close)

    def _count(self, mechanism: str, outcome: str) -> None:
        if self.on_result is not None:
            self.on_result(mechanism, self.verifier.name, outcome)


__all__ = ["AuthGate", "Decision", "ResultHook"]
