"""The soak's verdict: what the clients saw against what the backend queued.

Each message a client started is one :class:`Sent`, with the outcome the
client saw:

- ``acked``: the client read ``250`` after its final dot. It must have been
  queued exactly once, with the digest the client computed.
- ``abandoned``: the client went away (or was cut off) before sending the
  final dot. It must not have been queued.
- ``refused``: the client sent the final dot and read a reply other than
  ``250``. It must not have been queued (qmail-smtpd answers after queueing,
  so a refusal means the queue never took it). Only ``doomed`` messages may
  be refused: every other one is valid mail, and refusing it is a defect.
- ``unsure``: the client sent the final dot and never read a reply (it went
  away on purpose, or the connection broke). It may have been queued, at most
  once, and then with its own digest.

``doomed`` messages (sent to the recipient that makes the backend die in the
body) must never be queued, whatever the client saw. Independently of
outcomes, nothing may be queued twice and nothing may be queued that no
client sent.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

OUTCOMES = ("acked", "abandoned", "refused", "unsure")


@dataclass(frozen=True)
class Sent:
    id: str
    sha256: str
    outcome: str
    doomed: bool = False
    reply: str = ""  # the reply to the final dot, when there was one


@dataclass(frozen=True)
class Queued:
    id: str | None
    sha256: str


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    queued: int = 0
    unsure_queued: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def read_queue(directory: Path) -> list[Queued]:
    """The records the backend left, one per message it answered 250 to."""
    found = []
    for path in sorted(directory.glob("[!.]*.json")):
        record = json.loads(path.read_text())
        found.append(Queued(record["id"], record["sha256"]))
    return found


def check(sent: Iterable[Sent], queued: Iterable[Queued], *, limit: int = 20) -> Verdict:
    """Every rule of the module docstring; at most ``limit`` problems are listed."""
    verdict = Verdict()
    by_id: dict[str, list[Queued]] = {}
    for q in queued:
        verdict.queued += 1
        if q.id is None:
            verdict.problems.append("a message without X-Soak-Id was queued")
            continue
        by_id.setdefault(q.id, []).append(q)
    known: dict[str, Sent] = {}
    for s in sent:
        if s.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {s.outcome!r}")
        if s.id in known:
            raise ValueError(f"message id {s.id} sent twice")
        known[s.id] = s
        verdict.outcomes[s.outcome] += 1
        verdict.problems.extend(_judge(s, by_id.get(s.id, [])))
        if s.outcome == "unsure" and s.id in by_id:
            verdict.unsure_queued += 1
    for ident in sorted(set(by_id) - set(known)):
        verdict.problems.append(f"{ident}: queued but no client sent it")
    if len(verdict.problems) > limit:
        more = len(verdict.problems) - limit
        verdict.problems[limit:] = [f"... and {more} more"]
    return verdict


def _judge(s: Sent, copies: list[Queued]) -> list[str]:
    problems = []
    if len(copies) > 1:
        problems.append(f"{s.id}: queued {len(copies)} times")
    if any(c.sha256 != s.sha256 for c in copies):
        problems.append(f"{s.id}: queued with a body that differs from the one sent")
    if s.doomed and copies:
        problems.append(f"{s.id}: queued although the backend died in its body")
    elif s.outcome == "acked" and not copies:
        problems.append(f"{s.id}: the client saw 250 but it was not queued (lost)")
    elif s.outcome == "abandoned" and copies:
        problems.append(f"{s.id}: abandoned before the final dot but queued")
    elif s.outcome == "refused" and copies:
        problems.append(f"{s.id}: refused to the client but queued")
    elif s.outcome == "refused" and not s.doomed:
        problems.append(f"{s.id}: a valid message was refused: {s.reply}")
    return problems


def summary(verdict: Verdict, by_kind: Mapping[str, int] | None = None) -> list[str]:
    """Human-readable lines for the report."""
    lines = [
        "messages: "
        + ", ".join(f"{name} {verdict.outcomes.get(name, 0)}" for name in OUTCOMES)
        + f"; queued {verdict.queued} (of the unsure: {verdict.unsure_queued})"
    ]
    if by_kind:
        lines.append("sessions: " + ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items())))
    return lines
