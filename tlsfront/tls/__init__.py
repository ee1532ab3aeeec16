"""All of TLS.

Contexts built from settings, the server stream engine, the outbound client
side, certificates.
"""
