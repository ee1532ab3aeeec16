"""A password that does not show itself.

`Secret` holds the bytes of a password (or of a protocol line that carries
one) so that printing, formatting or logging it, a traceback's locals
included, shows `<secret>`. The holder asks for the value with `reveal()`
only where it must hand it on, and calls `wipe()` when the check is done:
the bytes are kept in a `bytearray` that is zeroed in place, so the copy held
here does not outlive the check (copies made by `reveal()` are the caller's).
"""

from __future__ import annotations

import hmac
from typing import NoReturn


class Secret:
    """Bytes that never appear in a repr, a str or a pickle."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes | bytearray) -> None:
        self._value = bytearray(value)

    def reveal(self) -> bytes:
        return bytes(self._value)

    def wipe(self) -> None:
        """Overwrite the bytes in place and forget them."""
        for i in range(len(self._value)):
            self._value[i] = 0
        self._value = bytearray()

    def matches(self, other: bytes) -> bool:
        """Compares in constant time (for tests and simple verifiers)."""
        return hmac.compare_digest(bytes(self._value), other)

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return "<secret>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")


__all__ = ["Secret"]
