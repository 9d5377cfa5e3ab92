"""Errors that must never stop the pipeline: throttled error logging, and callbacks wrapped so
that whatever they raise is counted and logged instead of propagating.

A ROS executor ends ``spin()`` on the first exception a subscription, timer or service callback
raises (and message_filters releases its lock without try/finally around the user callback), so
the node wraps every callback in a :class:`CallbackGuard`; the runner uses :class:`Throttle` for
the inference thread's errors.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class Throttle:
    """Log an error the first time (with its traceback), then at most once per ``period_s`` per
    key, with the count so far."""

    def __init__(self, period_s: float = 5.0, logger: logging.Logger | None = None) -> None:
        self.period_s = period_s
        self.logger = logger or log
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str, msg: str, exc: BaseException) -> None:
        with self._lock:
            self._count[key] = self._count.get(key, 0) + 1
            count = self._count[key]
            now = time.monotonic()
            due = now - self._last.get(key, -1e18) >= self.period_s
            first = key not in self._last
            if due:
                self._last[key] = now
        if due:
            self.logger.error("%s (%d so far): %s: %s", msg, count, type(exc).__name__, exc,
                              exc_info=exc if first else None)

    def count(self, key: str) -> int:
        with self._lock:
            return self._count.get(key, 0)


class CallbackGuard:
    """Wraps callbacks so that an exception is counted per callback name and logged (throttled),
    and the callback returns ``fallback`` (a service callback's response, say) instead of raising.
    """

    def __init__(self, period_s: float = 5.0, logger: logging.Logger | None = None) -> None:
        self.throttle = Throttle(period_s, logger)
        self._names: set[str] = set()

    def wrap(self, name: str, fn: F, fallback: Callable[..., Any] | None = None) -> F:
        """``fn`` guarded; ``fallback(*args)`` gives the return value after an exception."""
        self._names.add(name)

        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a callback must never end the executor
                self.throttle(name, f"callback {name} failed", exc)
                return fallback(*args) if fallback is not None else None

        return guarded  # type: ignore[return-value]

    def errors(self) -> dict[str, int]:
        """Exceptions caught so far, by callback name."""
        return {n: self.throttle.count(n) for n in sorted(self._names)}

    @property
    def total(self) -> int:
        return sum(self.errors().values())
