"""The inbound half.

Listeners, one session per client (the trio shell around the SMTP dialogue),
backends, relay decisions, inetd.
"""
