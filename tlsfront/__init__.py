"""tlsfront: a TLS front end for an unmodified qmail-smtpd."""

__version__ = "0.1.0"
