"""Errors that must never stop the pipeline (CallbackGuard, Throttle) and Python logging into
the ROS logger (RosLogHandler), on fakes that follow rclpy's rules."""

from __future__ import annotations

import inspect
import logging

import pytest

from pl3d_ros.guard import CallbackGuard, Throttle
from pl3d_ros.ros_logging import bridge_logging


def test_guard_counts_logs_and_returns_the_fallback(caplog):
    guard = CallbackGuard(period_s=60.0)
    calls = []

    def cb(x):
        calls.append(x)
        if x < 0:
            raise ValueError("negative")
        return x * 2

    safe = guard.wrap("cb", cb, fallback=lambda x: "fallback")
    with caplog.at_level(logging.ERROR):
        assert safe(2) == 4
        assert safe(-1) == "fallback" and safe(-2) == "fallback"
    assert guard.errors() == {"cb": 2} and guard.total == 2 and calls == [2, -1, -2]
    # throttled: the first failure is logged with its traceback, the second within the period not
    assert sum("callback cb failed" in r.getMessage() for r in caplog.records) == 1
    assert caplog.records[0].exc_info is not None
    assert guard.wrap("other", cb)(-1) is None  # no fallback: None


def test_throttle_logs_again_after_its_period(caplog, monkeypatch):
    t = {"now": 100.0}
    monkeypatch.setattr("pl3d_ros.guard.time.monotonic", lambda: t["now"])
    th = Throttle(period_s=5.0)
    with caplog.at_level(logging.ERROR):
        for dt in (0.0, 1.0, 6.5):
            t["now"] += dt
            th("k", "op failed", RuntimeError("x"))
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and "(3 so far)" in msgs[1] and th.count("k") == 3


class RclpyLikeLogger:
    """rclpy's RcutilsLogger rule: one call site (file, line) keeps one severity forever."""

    def __init__(self) -> None:
        self.sites: dict[tuple[str, int], str] = {}
        self.lines: list[tuple[str, str]] = []

    def _log(self, severity: str, msg: str) -> None:
        caller = inspect.stack()[2]  # the frame that called debug/info/...
        site = (caller.filename, caller.lineno)
        if self.sites.setdefault(site, severity) != severity:
            raise ValueError("Logger severity cannot be changed between calls.")
        self.lines.append((severity, msg))

    def debug(self, msg): self._log("DEBUG", msg)  # noqa: E704
    def info(self, msg): self._log("INFO", msg)  # noqa: E704
    def warning(self, msg): self._log("WARN", msg)  # noqa: E704
    def error(self, msg): self._log("ERROR", msg)  # noqa: E704
    def fatal(self, msg): self._log("FATAL", msg)  # noqa: E704


def test_library_logging_reaches_the_ros_logger_at_every_severity():
    ros = RclpyLikeLogger()
    handler = bridge_logging(ros, level=logging.INFO)
    try:
        lg = logging.getLogger("pl3d_ros.runtime.tensorrt_backend")
        lg.info("building engine: 40%")
        lg.warning("fp16 parity low")
        lg.error("swap rejected")
        lg.critical("cuda gone")
        lg.debug("not at INFO")
        lg.info("building engine: 80%")  # the same severity from the same site again: fine
    finally:
        logging.getLogger("pl3d_ros").removeHandler(handler)
        logging.getLogger("pl3d_ros").propagate = True
    assert [s for s, _ in ros.lines] == ["INFO", "WARN", "ERROR", "FATAL", "INFO"]
    assert ros.lines[0][1] == "[pl3d_ros.runtime.tensorrt_backend] building engine: 40%"


def test_a_broken_ros_logger_does_not_break_the_caller(monkeypatch):
    class Broken:
        def __getattr__(self, name):
            def fail(msg):
                raise RuntimeError("rcl context gone")
            return fail

    monkeypatch.setattr(logging, "raiseExceptions", False)  # handleError stays quiet, as in production
    handler = bridge_logging(Broken())
    try:
        logging.getLogger("pl3d_ros.x").error("still fine")
    finally:
        logging.getLogger("pl3d_ros").removeHandler(handler)
        logging.getLogger("pl3d_ros").propagate = True
