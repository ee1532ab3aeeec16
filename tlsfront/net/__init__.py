"""Small network pieces shared by both halves.

Addresses, DNS resolvers, try-then-wait streams, the PROXY protocol.
"""
