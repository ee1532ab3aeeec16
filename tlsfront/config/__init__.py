"""Configuration.

The TOML schema (each key with where it applies), converters, checks, and
the build into frozen dataclasses.
"""
