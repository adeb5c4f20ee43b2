"""At most one log line per interval for events a client can repeat at will."""

from __future__ import annotations

import logging
import math


class Throttle:
    """Lets one event through per ``interval`` seconds and counts the ones held back."""

    __slots__ = ("_next", "held", "interval")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.held = 0
        self._next = -math.inf

    def passes(self, now: float) -> int | None:
        """The number held back since the last one that passed, or None to hold this one."""
        if now < self._next:
            self.held += 1
            return None
        held, self.held = self.held, 0
        self._next = now + self.interval
        return held


class ThrottledLog:
    """One logger line per interval; the next line says how many were left out."""

    __slots__ = ("_logger", "_throttle")

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        self._logger = logger
        self._throttle = Throttle(interval)

    def log(self, now: float, level: int, message: str, *args: object) -> None:
        held = self._throttle.passes(now)
        if held is None or not self._logger.isEnabledFor(level):
            return
        if held:
            message += " (%d more like it since the last such line)"
            args = (*args, held)
        self._logger.log(level, message, *args)
