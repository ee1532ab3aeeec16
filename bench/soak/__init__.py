"""`python -m bench.soak`: tlsfront under mixed load while faults are injected.

Theory of operation
-------------------
:mod:`bench.soak.stand` starts a real ``tlsfront run`` (two workers; a
STARTTLS, an implicit-TLS and a plaintext profile) whose backend
(:mod:`bench.soak.backend`, the bundled sink) records every message it queues
by the id in its first header. Client threads (:mod:`bench.soak.clients`)
run sessions against all three profiles, some of them faulty, and note for
every message what they saw: ``250``, another reply, nothing after the final
dot, or no final dot at all. Meanwhile the main thread sends the server
SIGHUP every few seconds, rewrites the relay list, and once kills a worker
with SIGKILL.

When the time is up no new session starts; the running ones end by
themselves (every client socket has a timeout, so a server that stops
answering is found, not waited for). Then :mod:`bench.soak.check` holds the
clients' notes against the backend's records, the metrics must show no
session left, and the server's memory and descriptors are compared with
their level after a warm-up, before the load.
"""
