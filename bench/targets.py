"""The servers a run measures: the sink, tlsfront, nginx's mail proxy, stunnel, tcpserver.

Each starter writes its program's configuration into the run's directory,
starts it pinned to the server cores, waits until it listens, and returns a
`Target`: the ports it serves per client mode, and the process whose CPU
time and memory are charged to it. nginx, stunnel and tcpserver are
optional: a starter returns None when its program is not installed.
"""

from __future__ import annotations

import glob
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Proc, free_port, wait_listening

HERE = Path(__file__).resolve().parent
SMTPD = HERE / "smtpd.pl"  # the exec-backend stand-in (perl is essential on Debian)


@dataclass
class Target:
    name: str
    ports: dict[str, int]  # client mode ("plain", "starttls", "implicit") -> port
    proc: Proc  # the process charged with CPU time and memory
    extra: list[Proc] = field(default_factory=list)  # helpers (not charged)
    note: str = ""

    def stop(self) -> None:
        for proc in [self.proc, *self.extra]:
            proc.stop()


@dataclass
class Sink:
    proc: Proc
    smtp: int
    auth: int


def start_sink(directory: Path, cpus: set[int]) -> Sink:
    proc = Proc(
        [sys.executable, "-m", "bench.sink"],
        cpus,
        directory / "sink.log",
        stdout=subprocess.PIPE,
        cwd=HERE.parent,
    )
    ports = proc.read_json()
    return Sink(proc, ports["smtp"], ports["auth"])


def baseline(sink: Sink) -> Target:
    return Target("plaintext", {"plain": sink.smtp}, sink.proc, note="client straight to the sink")


def _toml(value: object) -> str:
    return json.dumps(str(value))


def start_tlsfront(
    directory: Path,
    cpus: set[int],
    cert: Path,
    key: Path,
    *,
    backend_connect: str | None = None,
    backend: list[str] | None = None,
    modes: tuple[str, ...] = ("starttls", "implicit"),
    log_level: str = "warning",
    name: str = "tlsfront",
    wrap: Sequence[str] = (),
) -> Target:
    """tlsfront with one profile per mode, listening on kernel-chosen ports.

    `wrap`: a command to run it under (valgrind, for bench.instructions).
    """
    if backend is not None:
        backend_line = "backend = [" + ", ".join(_toml(a) for a in backend) + "]"
    else:
        backend_line = f"backend_connect = {_toml(backend_connect)}"
    tls_of = {"starttls": "starttls", "implicit": "implicit", "plain": "none"}
    profiles = []
    for mode in modes:
        tls = tls_of[mode]
        cert_lines = "" if tls == "none" else f"cert = {_toml(cert)}\nkey = {_toml(key)}\n"
        profiles.append(
            f'[profile.{mode}]\nlisten = ["127.0.0.1:0"]\ntls = "{tls}"\n{cert_lines}'
            f"{backend_line}\nmax_connections = 100000\nmax_per_ip = 100000\n"
        )
    config = directory / f"{name}.toml"
    config.write_text(
        f'[defaults]\nhostname = "front.bench"\nlog_level = "{log_level}"\n\n' + "\n".join(profiles)
    )
    proc = Proc(
        [*wrap, sys.executable, "-m", "bench.front", str(config)],
        cpus,
        directory / f"{name}.log",
        stdout=subprocess.PIPE,
        cwd=HERE.parent,
    )
    ports = proc.read_json(timeout=120 if wrap else 30)
    return Target(name, ports, proc)


def nginx_available() -> tuple[str, str] | None:
    """(nginx binary, mail module) when both are installed."""
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    modules = glob.glob("/usr/lib/nginx/modules/ngx_mail_module.so")
    if binary is None or not modules:
        return None
    return binary, modules[0]


def start_nginx(
    directory: Path, cpus: set[int], cert: Path, key: Path, sink: Sink, wrap: Sequence[str] = ()
) -> Target | None:
    """nginx's mail proxy: STARTTLS on one port, implicit TLS on another, one worker.

    Its leanest configuration: no `ssl_session_cache` (a shared cache costs
    memory up front; resumption still works by TLS 1.3 session tickets).

    Under `wrap` (valgrind) it runs as a single process (`master_process off`).
    """
    found = nginx_available()
    if found is None:
        return None
    binary, module = found
    starttls, implicit = free_port(), free_port()
    root = directory / "nginx"
    root.mkdir(exist_ok=True)
    conf = root / "nginx.conf"
    conf.write_text(
        f"""load_module {module};
worker_processes 1;
worker_rlimit_nofile 65536;
pid {root}/nginx.pid;
error_log {root}/error.log error;
events {{ worker_connections 32768; }}
mail {{
    server_name front.bench;
    auth_http 127.0.0.1:{sink.auth}/auth;
    proxy_pass_error_message on;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    smtp_auth none;
    xclient off;
    server {{
        listen 127.0.0.1:{starttls};
        protocol smtp;
        starttls on;
    }}
    server {{
        listen 127.0.0.1:{implicit} ssl;
        protocol smtp;
    }}
}}
"""
    )
    proc = Proc(
        [
            *wrap,
            binary,
            "-p",
            str(root),
            "-e",
            str(root / "error.log"),
            "-c",
            str(conf),
            "-g",
            f"daemon off; master_process {'off' if wrap else 'on'};",
        ],
        cpus,
        directory / "nginx.log",
    )
    try:
        wait_listening(starttls, timeout=120 if wrap else 10)
        wait_listening(implicit, timeout=120 if wrap else 10)
    except OSError:
        proc.stop()
        return None
    return Target("nginx", {"starttls": starttls, "implicit": implicit}, proc)


def start_stunnel(
    directory: Path, cpus: set[int], cert: Path, key: Path, sink: Sink
) -> Target | None:
    """stunnel: implicit TLS in front of the sink (it has no server-side STARTTLS)."""
    binary = shutil.which("stunnel4") or shutil.which("stunnel")
    if binary is None:
        return None
    port = free_port()
    conf = directory / "stunnel.conf"
    conf.write_text(
        f"""foreground = yes
pid =
debug = 3
output = {directory}/stunnel-out.log
[smtps]
accept = 127.0.0.1:{port}
connect = 127.0.0.1:{sink.smtp}
cert = {cert}
key = {key}
sslVersionMin = TLSv1.2
"""
    )
    proc = Proc([binary, str(conf)], cpus, directory / "stunnel.log")
    try:
        wait_listening(port)
    except OSError:
        proc.stop()
        return None
    return Target("stunnel", {"implicit": port}, proc)


def start_tcpserver(directory: Path, cpus: set[int], program: list[str]) -> Target | None:
    """tcpserver running `program` per connection, plaintext: the exec baseline."""
    binary = shutil.which("tcpserver")
    if binary is None:
        return None
    port = free_port()
    proc = Proc(
        [
            binary,
            "-q",
            "-R",
            "-H",
            "-l",
            "front.bench",
            "-c",
            "10000",
            "-b",
            "1024",
            "127.0.0.1",
            str(port),
            *program,
        ],
        cpus,
        directory / "tcpserver.log",
    )
    try:
        wait_listening(port)
    except OSError:
        proc.stop()
        return None
    return Target("tcpserver", {"plain": port}, proc)


def versions() -> dict[str, str]:
    """Versions of everything measured, for the report."""
    import platform
    import ssl

    import trio
    from OpenSSL import SSL

    out = {
        "python": platform.python_version(),
        "trio": trio.__version__,
        "pyOpenSSL's OpenSSL": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
        "system OpenSSL (ssl module)": ssl.OPENSSL_VERSION,
    }
    found = nginx_available()
    if found:
        text = subprocess.run([found[0], "-v"], capture_output=True, text=True).stderr
        out["nginx"] = text.strip().split("/")[-1]
    stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
    if stunnel:
        text = subprocess.run(
            [stunnel, "-version"], capture_output=True, text=True, stdin=subprocess.DEVNULL
        ).stderr
        for line in text.splitlines():
            if line.startswith("stunnel "):
                out["stunnel"] = line.split()[1]
                break
    if shutil.which("dpkg-query") and shutil.which("tcpserver"):
        text = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "ucspi-tcp"], capture_output=True, text=True
        ).stdout
        out["ucspi-tcp"] = text.strip() or "?"
    if shutil.which("perl"):
        text = subprocess.run(["perl", "-e", "print $^V"], capture_output=True, text=True).stdout
        out["perl"] = text.strip()
    return out


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os
    import platform

    return f"{model}, {os.cpu_count()} cores, Linux {platform.release()}"
