"""SMTP AUTH: the SASL exchanges, the password verifiers and the abuse limits.

The building blocks are independent of the SMTP dialogue: `sasl` turns the
AUTH command and the client's lines into credentials (and builds the client
side for the outbound relay), a `Verifier` (`checkpassword`, `dovecot`)
decides whether they are good, and `throttle` makes failures expensive.
"""
