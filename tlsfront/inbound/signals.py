"""What a session's tasks wait on: wake-ups without a task of their own.

`Signal` wakes, at each change to a phase, only the tasks whose condition
now holds; `ShutdownNotice` tells every session that the server stops.
"""

from __future__ import annotations

from collections.abc import Callable

import trio


class Signal:
    """Wakes, at each pulse, the waiting tasks whose condition now holds.

    The conditions are evaluated by `pulse` itself, so a task whose
    condition a change did not make true is not scheduled at all: a task
    switch costs far more than a few attribute reads.
    """

    def __init__(self) -> None:
        self._waiters: list[tuple[Callable[[], bool], trio.Event]] = []

    def pulse(self) -> None:
        if not self._waiters:
            return
        waiting: list[tuple[Callable[[], bool], trio.Event]] = []
        for condition, event in self._waiters:
            if condition():
                event.set()
            else:
                waiting.append((condition, event))
        self._waiters = waiting

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until a pulse finds `condition()` true (the caller saw it false)."""
        entry = (condition, trio.Event())
        self._waiters.append(entry)
        try:
            await entry[1].wait()
        finally:
            if not entry[1].is_set():
                self._waiters.remove(entry)


class ShutdownNotice:
    """Set when the server stops: sessions close at their next idle point.

    `trio.Event`'s interface, plus callbacks run when it is set, so that a
    session learns of it without a task of its own waiting on it.
    """

    def __init__(self) -> None:
        self._event = trio.Event()
        self._callbacks: set[Callable[[], None]] = set()

    def set(self) -> None:
        if not self._event.is_set():
            self._event.set()
            for callback in list(self._callbacks):
                callback()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._callbacks.add(callback)

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        self._callbacks.discard(callback)


__all__ = ["ShutdownNotice", "Signal"]
