"""Learning the backend's face for the backend on demand.

Theory of operation
-------------------
With `backend_start = "on-demand"`, tlsfront answers the greeting and EHLO
itself, in the backend's words (`tlsfront.smtp.face`). Those words are
learned here, per profile, when the server starts and after each reload:

* `probe` starts the backend once, exactly as for a session of a local
  client: the client is 127.0.0.1 port 0 (`TCPREMOTEIP=127.0.0.1`,
  `TCPREMOTEPORT=0`), the local address 127.0.0.1 and the profile's first
  listening port, with what a session's backend inherits, the profile's
  `env` and the variables its tcprules give 127.0.0.1, and no TLS
  variables. It reads the greeting, sends `EHLO <hostname>`, reads the
  reply, sends `QUIT` and closes, all within `PROBE_TIMEOUT` (or
  `timeout_backend`, if shorter).
* where `qmail_control` is set, the greeting text is qmail-smtpd's own:
  `control/smtpgreeting`, else `control/me`.

A probe that fails (the backend is down at start, or refuses a local
client) is logged, and the server starts anyway: the greeting is then the
control files' text or the host name, and the EHLO reply offers none of
the backend's extensions, only tlsfront's own (STARTTLS, SIZE). The first
session whose backend answers its EHLO then teaches the extensions
(`LearnedFace.learn_from_session`), and the next reload probes again. A
reload probes before the new configuration takes its first session; should
that probe fail, what the old one learned stays, if the backend's settings
did not change.

`LearnedFace` is the one part of a `ProfileRuntime` that changes after it
is built; a session takes `current` once, when it starts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import trio

from tlsfront.config.schema import Profile
from tlsfront.inbound.backend import (
    Backend,
    BackendError,
    BackendStarter,
    ExecBackend,
    start_backend,
    ucspi_environment,
)
from tlsfront.net.address import Address, split_host_port
from tlsfront.qmail.control import QmailControlError, read_control
from tlsfront.smtp.face import BackendFace, Probe, ProbeFailed
from tlsfront.smtp.reply import Reply

log = logging.getLogger("tlsfront.inbound.probe")

PROBE_TIMEOUT = 10.0  # seconds for the whole probe session
PROBE_CLIENT = Address("127.0.0.1", 0)


def greeting_text(profile: Profile) -> str:
    """What qmail-smtpd would greet with: smtpgreeting, me, else the host name."""
    if profile.qmail_control is not None:
        try:
            control = read_control(Path(profile.qmail_control))
        except QmailControlError as exc:
            log.warning("profile %s: %s", profile.name, exc)
        else:
            text = control.smtpgreeting or control.me
            if text:
                return text
    return str(profile.hostname)


class LearnedFace:
    """A profile's `BackendFace`: conservative until a probe or a session teaches it."""

    def __init__(self, profile: Profile) -> None:
        self._profile = profile
        self.text = greeting_text(profile) if profile.qmail_control is not None else None
        self.current = BackendFace.conservative(self.text or profile.hostname)

    def learn(self, greeting: Reply, ehlo: Reply) -> None:
        self.current = BackendFace.learned(greeting, ehlo, self.text)

    def learn_from_session(self, ehlo: Reply) -> None:
        """A session's backend answered EHLO while no probe had succeeded."""
        if not self.current.probed:
            self.learn(self.current.greeting, ehlo)
            log.info("profile %s: backend extensions learned from a session", self._profile.name)

    def take_over(self, old: LearnedFace) -> None:
        """At a reload, should the new probe fail: what the old runtime learned.

        Only where nothing the backend's words depend on has changed.
        """
        p, q = self._profile, old._profile
        keys = ("backend", "backend_connect", "env", "hostname", "qmail_control", "rules")
        same = all(getattr(p, key) == getattr(q, key) for key in keys)
        if same and old.current.probed:
            self.learn(old.current.greeting, old.current.ehlo)


def probe_environment(
    profile: Profile, rules_env: Mapping[str, str], inherited: Mapping[str, str]
) -> dict[str, str]:
    port = 0
    if profile.listen:
        port = split_host_port(profile.listen[0])[1]
    return ucspi_environment(
        client=PROBE_CLIENT,
        local=Address("127.0.0.1", port),
        hostname=profile.hostname,
        profile_env=profile.env,
        rules_env=rules_env,
        tls_env={},
        relay=False,
        inherited=inherited,
    )


async def _converse(backend: Backend, probe: Probe) -> None:
    while not probe.done:
        probe.receive(await backend.receive_some())
        output = probe.take_output()
        if output:
            await backend.send_all(output)


async def probe(
    profile: Profile,
    face: LearnedFace,
    rules_env: Mapping[str, str] | None = None,
    inherited: Mapping[str, str] | None = None,
    starter: BackendStarter = start_backend,
) -> bool:
    """Start the backend once and learn its face; False (logged) if that failed."""
    env = probe_environment(profile, rules_env or {}, inherited or {})
    conversation = Probe(profile.hostname)
    why = ""
    with trio.move_on_after(min(PROBE_TIMEOUT, profile.timeout_backend)) as timer:
        try:
            backend = await starter(profile, env, False)
        except BackendError as exc:
            why = str(exc)
        else:
            if isinstance(backend, ExecBackend):
                backend.stderr.watch("probe")  # what it writes names the probe
            try:
                await _converse(backend, conversation)
            except ProbeFailed as exc:
                why = str(exc)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                why = "the backend closed the connection"
            finally:
                await backend.aclose()
    if timer.cancelled_caught:
        why = "no answer in time"
    greeting, ehlo = conversation.greeting, conversation.ehlo
    if why or greeting is None or ehlo is None:
        log.warning(
            "profile %s: backend probe failed (%s): EHLO offers none of its extensions"
            " until a probe or a session succeeds",
            profile.name,
            why or "incomplete",
        )
        return False
    face.learn(greeting, ehlo)
    log.info("profile %s: backend probed: %d EHLO keywords", profile.name, len(ehlo.lines) - 1)
    return True


__all__ = ["LearnedFace", "greeting_text", "probe", "probe_environment"]
