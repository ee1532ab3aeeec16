"""Helpers shared by the tests: stand-in backends, hostile clients, fakes."""
