"""Opening a remote session for one destination domain.

Theory of operation: the destination's hosts (route, or MX records, or the
domain itself) are tried in order; for each host the TLS policy is decided
(`policy.decide`), its addresses are looked up, and each address is tried
with the decision's attempts. An attempt connects, waits for `220`, says
EHLO, does STARTTLS as the attempt says, checks the certificate as the
policy says, says EHLO again and sends `MAIL FROM`. Whatever the server
answers to MAIL ends the search: the session is handed to the relay, which
passes that answer on. Any failure before MAIL moves on:

* an optional TLS attempt whose handshake fails is followed by the next
  attempt on a new connection to the same address (cleartext, as Postfix
  does; the qmail-tls patch deferred instead);
* anything else (connect error, greeting not 220, required TLS missing or
  not verified, timeout) moves to the next address, then the next host.

A host the profile has credentials for (`route_credentials`, `smtproutes`)
is logged in to after the second EHLO, and only over TLS whose certificate
was checked: its decision is raised to `verify` first. The server's answer
to AUTH is final (see `tlsfront.outbound.login`).

When no host is left, the result is a `451` (`4.7.5` when a TLS requirement
was what failed, `4.4.0` otherwise), so qmail retries later; a domain that
does not exist, or publishes a null MX, gets the permanent answer
qmail-remote would have given itself.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import trio
from cryptography import x509

from tlsfront.config.schema import Profile
from tlsfront.net.address import ip_literal
from tlsfront.outbound import stats
from tlsfront.outbound.client import RemoteError, SmtpClient
from tlsfront.outbound.context import Runtime
from tlsfront.outbound.control import ControlDirs, host_facts
from tlsfront.outbound.credentials import Login
from tlsfront.outbound.dane import check_chain, lookup_tlsa
from tlsfront.outbound.login import log_in
from tlsfront.outbound.mtasts import StsPolicy
from tlsfront.outbound.mx import Destination, Dns, DnsFailure, Hop, find_hops
from tlsfront.outbound.policy import (
    Decision,
    HostFacts,
    TlsAttempt,
    Trust,
    decide,
    with_credentials,
)
from tlsfront.smtp import replies
from tlsfront.smtp.reply import Reply
from tlsfront.tls.client import (
    ClientContext,
    ClientTLSStream,
    client_context,
    matches_any,
    peer_chain,
)

log = logging.getLogger("tlsfront.outbound")


@dataclass(frozen=True)
class TlsInfo:
    version: str | None = None
    cipher: str | None = None
    verified: bool = False
    policy: str = "default"

    @property
    def label(self) -> str:
        """The stats label: verified, encrypted or cleartext."""
        if self.version is None:
            return "cleartext"
        return "verified" if self.verified else "encrypted"

    def describe(self) -> str:
        if self.version is None:
            return f"tls=cleartext policy={self.policy}"
        verified = "yes" if self.verified else "no"
        return f"tls={self.version} cipher={self.cipher} verified={verified} policy={self.policy}"


@dataclass
class RemoteSession:
    client: SmtpClient
    domain: str
    where: str  # host[address]:port
    tls: TlsInfo
    mail_reply: Reply
    login: str | None = None  # the user logged in as (AUTH), for the log


@dataclass(frozen=True)
class _Failed:
    reason: str
    tls: bool = False  # a TLS requirement failed
    retry: bool = False  # an optional TLS handshake failed: the next attempt may follow
    final: Reply | None = None  # the answer for qmail-remote: try nothing else


def _where(hop: Hop, address: str) -> str:
    shown = f"[{address}]" if ":" in address else address
    return f"{hop.host}[{shown}]:{hop.port}"


class Dialer:
    def __init__(self, profile: Profile, runtime: Runtime, dirs: ControlDirs) -> None:
        self.profile = profile
        self.runtime = runtime
        self.dirs = dirs
        self.dane = profile.dane and bool(profile.dns_servers)
        self.dns: Dns = runtime.dns(profile.dns_servers, dnssec=self.dane)
        self.helo = profile.helo_name or profile.hostname or "localhost"

    async def open(self, domain: str, sender: bytes) -> RemoteSession | Reply:
        """A session with MAIL sent, or the reply to give qmail-remote."""
        try:
            dest = await find_hops(domain, self.profile.routes, self.dns, self.runtime.smtp_port)
        except DnsFailure as err:
            if err.permanent:
                return replies.relay_no_such_domain(err.message)
            return replies.relay_dns_failed(err.message)
        logins = self.runtime.logins(self.profile).get()
        if logins is None:
            return replies.relay_credentials_unreadable()
        sts = await self._sts(dest)
        last, tls_failed = f"{domain}: no host to try", False
        for hop in dest.hops:
            facts = await self._facts(dest, hop)
            decision = decide(domain, hop.host, self.profile.tls_policy, facts, sts)
            login = logins.find(hop.host, hop.port)
            if login is not None:
                decision = with_credentials(decision, hop.host, facts.pem)
            for note in decision.notes:
                log.warning("outbound domain=%s mx=%s mta-sts testing: %s", domain, hop.host, note)
            if decision.refuse is not None:
                last, tls_failed = f"{hop.host}: {decision.refuse}", True
                log.warning(
                    "outbound domain=%s mx=%s skipped: %s", domain, hop.host, decision.refuse
                )
                continue
            try:
                addresses = await self.dns.addresses(hop.host)
            except DnsFailure as err:
                last = err.message
                log.warning("outbound domain=%s mx=%s skipped: %s", domain, hop.host, err.message)
                continue
            if not addresses:
                last = f"{hop.host}: no address"
                continue
            for address in addresses:
                result = await self._try_address(domain, hop, address, decision, sender, login)
                if isinstance(result, RemoteSession):
                    return result
                if result.final is not None:
                    return result.final
                last, tls_failed = result.reason, tls_failed or result.tls
        if tls_failed:
            return replies.relay_tls_policy_not_met(last)
        return replies.relay_unreachable(last)

    async def _sts(self, dest: Destination) -> StsPolicy | None:
        if not self.profile.mta_sts or dest.source not in ("mx", "implicit"):
            return None
        runtime = self.runtime
        return await runtime.sts_cache.policy(
            dest.domain, self.dns, runtime.https_context(), runtime.connect, runtime.https_port
        )

    async def _facts(self, dest: Destination, hop: Hop) -> HostFacts:
        facts = host_facts(self.dirs, hop.host, dest.domain)
        applies = dest.secure or dest.source == "route"
        if not self.dane or not applies or ip_literal(hop.host) is not None:
            return facts
        try:
            answer = await lookup_tlsa(self.dns, hop.host, hop.port)
        except DnsFailure as err:
            return dataclasses.replace(facts, tlsa_error=f"TLSA look-up failed: {err.message}")
        if answer is None:
            return facts
        return dataclasses.replace(facts, tlsa=answer.records, tlsa_unusable=answer.unusable_only)

    async def _try_address(
        self,
        domain: str,
        hop: Hop,
        address: str,
        decision: Decision,
        sender: bytes,
        login: Login | None,
    ) -> RemoteSession | _Failed:
        attempts = decision.attempts
        for index, attempt in enumerate(attempts):
            result = await self._attempt(domain, hop, address, decision, attempt, sender, login)
            where = _where(hop, address)
            if isinstance(result, RemoteSession) or result.final is not None:
                return result
            stats.record_attempt("failed")
            log.warning(
                "outbound domain=%s mx=%s policy=%s attempt failed: %s",
                domain,
                where,
                decision.source,
                result.reason,
            )
            if not (result.retry and index + 1 < len(attempts)):
                return result
            following = attempts[index + 1]
            log.info(
                "outbound domain=%s mx=%s retrying %s",
                domain,
                where,
                "in cleartext" if following is None else "with TLS, certificate not checked",
            )
        return _Failed("no attempt left")  # pragma: no cover - attempts is never empty

    def _context(self, attempt: TlsAttempt, decision: Decision) -> ClientContext:
        verify = attempt.trust in (Trust.PEM, Trust.WEBPKI)
        pem = attempt.trust is Trust.PEM
        return client_context(
            verify=verify,
            cafile=decision.cafile if pem else self.runtime.trust_cafile,
            cadata=None if pem else self.runtime.trust_cadata,
            client_cert=self.dirs.client_cert,
            min_version=self.profile.min_tls_version,
        )

    async def _attempt(
        self,
        domain: str,
        hop: Hop,
        address: str,
        decision: Decision,
        attempt: TlsAttempt | None,
        sender: bytes,
        login: Login | None = None,
    ) -> RemoteSession | _Failed:
        where = _where(hop, address)
        try:
            with trio.fail_after(self.profile.timeout_connect):
                stream = await self.runtime.connect(address, hop.port)
        except trio.TooSlowError:
            return _Failed(f"{where}: connect timed out")
        except OSError as err:
            return _Failed(f"{where}: connect failed: {err.strerror or err}")
        client = SmtpClient(
            stream,
            self.profile.timeout_command,
            data_timeout=self.profile.timeout_data,
            handshake_timeout=self.profile.timeout_handshake,
        )
        try:
            greeting = await client.read_reply()
            if greeting.code != 220:
                await client.quit()
                return _Failed(f"{where}: greeting {greeting.first_line}")
            keywords = await client.hello(self.helo)
            tls = TlsInfo(policy=decision.source)
            if attempt is not None:
                outcome = await self._starttls(client, hop, decision, attempt, keywords)
                if isinstance(outcome, _Failed):
                    await client.aclose()
                    return dataclasses.replace(outcome, reason=f"{where}: {outcome.reason}")
                if outcome is not None:
                    tls = outcome
                    try:
                        await client.hello(self.helo)
                    except RemoteError as err:
                        # TLS 1.3 servers refuse a client certificate (or its
                        # absence) after the handshake: still a handshake failure
                        await client.aclose()
                        return _Failed(
                            f"{where}: after TLS handshake: {err.reason}",
                            tls=attempt.required,
                            retry=not attempt.required,
                        )
            if login is not None:
                refused = await self._log_in(client, login, tls, domain, where)
                if refused is not None:
                    return refused
            mail = await client.command(b"MAIL FROM:<" + sender + b">")
        except RemoteError as err:
            await client.aclose()
            return _Failed(f"{where}: {err.reason}")
        stats.record_attempt(tls.label)
        return RemoteSession(client, domain, where, tls, mail, login.user if login else None)

    async def _log_in(
        self, client: SmtpClient, login: Login, tls: TlsInfo, domain: str, where: str
    ) -> _Failed | None:
        """AUTH, only inside TLS checked for this host; None when logged in."""
        if not tls.verified:
            # the decision was raised to verify: this is the last line of defence
            await client.quit()
            return _Failed(f"{where}: credentials withheld: TLS not verified", tls=True)
        final = await log_in(client, login, domain, where)
        if final is None:
            return None
        await client.quit()
        return _Failed(f"{where}: {final.first_line}", final=final)

    async def _starttls(
        self,
        client: SmtpClient,
        hop: Hop,
        decision: Decision,
        attempt: TlsAttempt,
        keywords: set[str],
    ) -> TlsInfo | _Failed | None:
        """TLS per the attempt: its info, a failure, or None to go on in clear."""
        if "STARTTLS" not in keywords:
            if attempt.required:
                return _Failed("STARTTLS not offered but TLS is required", tls=True)
            if attempt.audit:
                log.warning("outbound mx=%s mta-sts testing: STARTTLS not offered", hop.host)
            return None
        reply = await client.command(b"STARTTLS")
        if reply.code != 220:
            if attempt.required:
                return _Failed(f"STARTTLS refused: {reply.first_line}", tls=True)
            return None
        try:
            ctx = self._context(attempt, decision)
        except OSError as err:  # ssl.SSLError is an OSError
            return _Failed(f"cannot set up TLS: {err}", tls=True)
        sni = None if ip_literal(hop.host) is not None else hop.host
        try:
            tls = await client.handshake(ctx, sni)
        except RemoteError as err:
            if attempt.audit:
                log.warning("outbound mx=%s mta-sts testing: %s", hop.host, err.reason)
            return _Failed(err.reason, tls=attempt.required, retry=not attempt.required)
        problem = self._check(tls, attempt, decision)
        if problem is not None and attempt.audit:
            log.warning("outbound mx=%s mta-sts testing: %s", hop.host, problem)
        elif problem is not None:
            return _Failed(problem, tls=True)
        cipher = tls.cipher()
        return TlsInfo(
            version=tls.version(),
            cipher=cipher[0] if cipher else None,
            verified=attempt.trust is not Trust.NONE and problem is None,
            policy=decision.source,
        )

    def _check(self, tls: ClientTLSStream, attempt: TlsAttempt, decision: Decision) -> str | None:
        """Why the certificate does not satisfy the policy, or None."""
        if attempt.trust is Trust.NONE:
            return None
        if attempt.trust is Trust.DANE:
            return check_chain(decision.tlsa, peer_chain(tls), decision.names)
        leaf = tls.getpeercert(binary_form=True)
        if not leaf:
            return "server sent no certificate"
        cert = x509.load_der_x509_certificate(leaf)
        if not matches_any(cert, decision.names):
            return f"certificate does not match {' or '.join(decision.names)}"
        return None
