"""The outbound relay: unmodified qmail-remote in, TLS to the world out.

qmail reaches it through `control/smtproutes` (`:127.0.0.1:10025`); for each
message it finds the destination's servers and delivers over TLS where it
can or must (the qmail-tls patch's control files, a `tls_policy` table,
MTA-STS, DANE), passing the remote server's replies back exactly.
"""
