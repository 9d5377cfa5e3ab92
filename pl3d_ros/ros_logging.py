"""Python ``logging`` into the node's ROS logger, so that the library's messages (TensorRT build
progress, adapter errors, runner warnings) reach the console, /rosout and the ROS log file.

rclpy's RcutilsLogger keys its per-call-site state on the calling line and refuses a call site
whose severity changes between calls ("Logger severity cannot be changed between calls"), so
each severity is forwarded from a line of its own.
"""

from __future__ import annotations

import logging
from typing import Any

PACKAGE_LOGGER = "pl3d_ros"


class RosLogHandler(logging.Handler):
    """Forwards records to an rclpy-style logger (``debug``/``info``/``warning``/``error``/
    ``fatal`` taking a message string). Never raises into the logging caller."""

    def __init__(self, ros_logger: Any, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.ros_logger = ros_logger
        self.setFormatter(logging.Formatter("[%(name)s] %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            ros = self.ros_logger
            if record.levelno >= logging.CRITICAL:
                ros.fatal(msg)
            elif record.levelno >= logging.ERROR:
                ros.error(msg)
            elif record.levelno >= logging.WARNING:
                ros.warning(msg)
            elif record.levelno >= logging.INFO:
                ros.info(msg)
            else:
                ros.debug(msg)
        except Exception:  # noqa: BLE001 - logging must not break the code that logs
            self.handleError(record)


def bridge_logging(ros_logger: Any, level: int = logging.INFO, name: str = PACKAGE_LOGGER) -> RosLogHandler:
    """Send the ``pl3d_ros`` loggers' records at ``level`` and above to ``ros_logger``; they no
    longer propagate to the root logger (which would print them a second time). Returns the
    handler (``logging.getLogger(name).removeHandler`` undoes it)."""
    handler = RosLogHandler(ros_logger)
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler
