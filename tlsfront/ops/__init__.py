"""Operations.

Logs, metrics, systemd, workers and privileges, file watches, and `tlsfront
check`.
"""
