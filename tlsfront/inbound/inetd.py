"""`tlsfront inetd`: one connection on stdin/stdout.

For inetd, systemd `Accept=yes` and tcpserver run scripts. The backend
starts at connect here, whatever `backend_start` says: the backend's face
that the on-demand start answers with is learned by a probe, and a process
per connection has nowhere to keep it. When standard
input is a socket its addresses are read from it; under tcpserver (or with
pipes) the TCPREMOTEIP / TCPREMOTEPORT / TCPLOCALIP / TCPLOCALPORT variables
tcpserver sets say who the client is, and TCPREMOTEHOST, when tcpserver
looked it up, is the client's name and the one `=host` rules match, as it
was for tcpserver's own rules (tcpserver -p confirms it). Under `tcpserver
-H`, or without tcpserver, tlsfront looks the name up itself as the
profile's `remote_host_lookup` says.

tlsfront is then one link of a UCSPI chain, like rblsmtpd or fixsmtpio: the
environment it was started with reaches the backend (the run script's
QMAILQUEUE, DATABYTES, CHKUSER_*, ..., and what tcpserver's -x rules set for
this client, RELAYCLIENT included: tcpserver saw the real client). tlsfront
replaces only the variables it owns (tlsfront.config.checks.is_owned: PROTO,
TCPLOCALIP/PORT/HOST, TCPREMOTEIP/PORT/HOST, SSL_*), sets RELAYCLIENT when a
certificate grants it, and leaves out systemd's LISTEN_* variables. The
profile's `env` and its own `rules` still apply, above the inherited ones.

A connection that the inetd starter (tlsfront.starter) hands to a running
`tlsfront run` with its environment is served by the same `serve_connection`.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Mapping
from dataclasses import replace

import trio

from tlsfront.config.account import Account
from tlsfront.config.schema import Profile
from tlsfront.inbound.backend import inherited_environment
from tlsfront.inbound.profileruntime import ProfileRuntime
from tlsfront.inbound.remotehost import safe_host
from tlsfront.inbound.server import ProfileServer
from tlsfront.net.address import Address, unmap
from tlsfront.net.netstream import NetStream
from tlsfront.ops.privileges import drop_to

log = logging.getLogger("tlsfront")


def _from_env(environ: Mapping[str, str], prefix: str) -> Address | None:
    ip = environ.get(f"TCP{prefix}IP")
    port = environ.get(f"TCP{prefix}PORT", "0")
    if not ip or not port.isdigit():
        return None
    return Address(unmap(ip), int(port))


def fd_stream(fd_in: int, fd_out: int) -> tuple[trio.abc.Stream, Address | None, Address | None]:
    """The connection on these two descriptors (the same socket twice, or two
    pipe ends), with the socket's addresses; the stream owns both descriptors."""
    if stat.S_ISSOCK(os.fstat(fd_in).st_mode):
        if fd_out != fd_in:
            os.close(fd_out)
        sock = socket.socket(fileno=fd_in)
        client: Address | None = None
        local: Address | None = None
        try:
            client = Address.from_sockaddr(sock.getpeername())
            local = Address.from_sockaddr(sock.getsockname())
        except OSError:  # the client is already gone
            pass
        return NetStream(sock), client, local
    stream = trio.StapledStream(trio.lowlevel.FdStream(fd_out), trio.lowlevel.FdStream(fd_in))
    return stream, None, None


def _stdio_stream() -> tuple[trio.abc.Stream, Address | None, Address | None]:
    return fd_stream(os.dup(0), os.dup(1))


async def serve_inetd(
    profile: Profile, environ: Mapping[str, str], account: Account | None = None
) -> int:
    """`tlsfront inetd`: the connection on stdin/stdout, in this process;
    `account`: become it once the keys are read."""
    runtime = ProfileRuntime.build(profile, eager=False, inherited=inherited_environment(environ))
    # One process per connection: no probe could be kept for the next one,
    # and one per connection would cost what the backend on demand saves.
    runtime.face = None
    stream, client, local = _stdio_stream()
    if runtime.rules is not None:
        # A process per connection has no earlier rules to fall back on: a
        # rules file that does not load closes the connection, as tcpserver
        # does without its cdb, rather than letting everyone in.
        try:
            runtime.rules.load()
        except Exception as exc:
            log.error("profile %s: %s: connection closed", profile.name, exc)
            with trio.move_on_after(5):
                await stream.aclose()
            return 1
    if account is not None and not account.is_root:
        # started as root (tcpserver without -u, inetd): the keys are read
        # now, then root is given up as tcpserver -u -g would have
        if runtime.tls is not None:
            runtime.tls.load()
        runtime.relay.load()
        drop_to(account)
        runtime.restamp()
    await serve_connection(ProfileServer(runtime), stream, client, local, environ)
    return 0


async def serve_connection(
    server: ProfileServer,
    stream: trio.abc.Stream,
    client: Address | None,
    local: Address | None,
    environ: Mapping[str, str],
) -> None:
    """One connection started the inetd way, with the environment it came with.

    `tlsfront inetd` calls it for its standard input and output, and the
    handoff socket (tlsfront.inbound.handoff) for a connection an inetd
    starter handed over with its environment, so that both serve the
    session the same way: the backend's environment starts from `environ`
    (`inherited_environment`), the client is who tcpserver's variables say.
    `client` and `local`: the socket's own addresses, when it is a socket.
    """
    runtime = replace(server.runtime, inherited=inherited_environment(environ))
    # tcpserver's variables, when present, are what tcpserver saw.
    client = _from_env(environ, "REMOTE") or client or Address("0.0.0.0", 0)
    local = _from_env(environ, "LOCAL") or local or Address("0.0.0.0", 0)
    host = safe_host(environ.get("TCPREMOTEHOST", ""))
    await server.serve_stream(stream, client, local, host, runtime)
