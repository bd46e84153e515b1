"""Where Ray's own logs go when a job runs quietly (the default): a log file, whose path the job
prints, instead of the console.

The console keeps the job's progress (`stbatch.*` log lines, the demo's steps) and its summary;
Ray's Python loggers (`ray`, `ray.data`: streaming-executor and progress lines, Ray Train's
controller), Python warnings and the workers' stdout / stderr (Ray Train's per-step reports,
which `log_to_driver=False` keeps in the workers' own files under Ray's session folder) are not
printed. Errors from Ray's loggers still reach the console. `--verbose` (`verbose: true`) leaves
all of it as Ray sets it up.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import tempfile

_FORMAT = "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d -- %(message)s"
_handler: logging.FileHandler | None = None


def _is_console(h: logging.Handler) -> bool:
    return isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)


def route_to_file() -> str:
    """Send Ray's Python loggers and Python warnings of this process to one log file (made on
    the first call; later calls return the same path). Call it after `ray` and `ray.data` are
    imported: importing them installs their console handlers."""
    global _handler
    if _handler is None:
        folder = os.path.join(tempfile.gettempdir(), "stbatch-logs")
        os.makedirs(folder, exist_ok=True)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        _handler = logging.FileHandler(os.path.join(folder, f"ray-{stamp}-{os.getpid()}.log"), encoding="utf-8")
        _handler.setFormatter(logging.Formatter(_FORMAT))
    names = ["ray"] + [n for n in logging.root.manager.loggerDict if n.startswith("ray.")]
    for name in names:
        lg = logging.getLogger(name)
        if name != "ray" and lg.propagate:
            continue  # its records reach the "ray" logger's handlers
        for h in lg.handlers:
            if _is_console(h) and h is not _handler:
                h.setLevel(max(h.level, logging.ERROR))
        if _handler not in lg.handlers:
            lg.addHandler(_handler)
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.propagate = False
    if _handler not in warnings_log.handlers:
        warnings_log.addHandler(_handler)
    return _handler.baseFilename


def current() -> str | None:
    """The log file Ray's logs go to in this process, if they were routed to one."""
    return None if _handler is None else _handler.baseFilename


def workers_folder() -> str | None:
    """The log folder of the Ray session this process is connected to (the workers' files), or
    None when it cannot be told."""
    try:
        import ray._private.worker as w

        return w._global_node.get_logs_dir_path()
    except Exception:  # noqa: BLE001 - a connected driver without a local node, or a Ray without it
        return None
