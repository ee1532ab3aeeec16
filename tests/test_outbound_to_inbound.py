"""Both halves together: qmail-remote → outbound tlsfront → inbound tlsfront → backend.

Everything real on loopback: the outbound profile pins the destination with
tlshosts/<host>.pem (TLS required and verified, as the patch did), the
inbound profile is tlsfront's own STARTTLS front end in front of the capture
backend.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support.front import Front
from support.outbound_fakes import qmail_remote

from tlsfront.ops.metrics_endpoint import outbound_metrics
from tlsfront.outbound import stats

INBOUND = """
[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {cert}
backend = {backend}
"""


def outbound(port: int, tlshosts: Path) -> str:
    return f"""
[profile.out]
mode = "outbound"
listen = ["127.0.0.1:0"]
tlshosts = {json.dumps(str(tlshosts))}
routes = {{{{ "example.org" = "127.0.0.1:{port}" }}}}
"""


async def test_qmail_remote_through_both_halves(
    start_front: Any, tls_dir: Path, tmp_path: Path
) -> None:
    stats.reset()
    inbound: Front = await start_front(INBOUND)
    tlshosts = tmp_path / "tlshosts"
    tlshosts.mkdir()
    (tlshosts / "127.0.0.1.pem").write_bytes((tls_dir / "ca.pem").read_bytes())
    relay: Front = await start_front(outbound(inbound.port("smtp"), tlshosts))
    with trio.fail_after(30):
        stream = await trio.open_tcp_stream("127.0.0.1", relay.port("out"))
        result = await qmail_remote(
            stream, b"alice@example.net", [b"bob@example.org"], b"Subject: both\n\nhello\n"
        )
        await stream.aclose()
    assert result.dot.startswith(b"250 ok ")  # the inbound backend's own reply, passed back
    (tls,) = inbound.sessions()  # one backend, started at MAIL, inside TLS
    assert tls["stdin"].startswith(b"EHLO ")  # the relay's own EHLO, passed on
    assert tls["env"]["SSL_PROTOCOL"].startswith("TLSv1.")
    (body,) = tls["messages"]
    assert b"(tlsfront) with ESMTPS" in body
    assert b"Subject: both" in body
    # The metrics count the delivery by its TLS outcome (issue: outbound trace).
    text = generate_latest(_Registry(list(outbound_metrics()))).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    (sample,) = families["tlsfront_outbound_deliveries"].samples
    assert sample.labels == {"result": "delivered", "tls": "verified"}
    assert sample.value == 1


class _Registry:
    """Just enough of a registry for generate_latest: fixed metric families."""

    def __init__(self, families: list[Any]) -> None:
        self._families = families

    def collect(self) -> Any:
        return iter(self._families)
