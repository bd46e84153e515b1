"""Quiet by default (issue 20): a job prints its own progress and summary; Ray's own logs go to a
file whose path it prints, and `--verbose` brings them back."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

ROUTED = r"""
import logging, sys, warnings
import ray, ray.data
from jobs import ray_logs
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
path = ray_logs.route_to_file()
assert ray_logs.route_to_file() == path == ray_logs.current()
logging.getLogger("ray.data._internal.execution.streaming_executor").info("ray data progress line")
logging.getLogger("ray.train").info("Reporting training result 1")
logging.getLogger("ray._private.worker").warning("ray warning line")
logging.getLogger("ray.data").error("ray error line")
warnings.warn("a deprecation warning", DeprecationWarning, stacklevel=1)
logging.getLogger("stbatch.job").info("the job's own progress")
print(path)
"""


def test_ray_loggers_and_warnings_go_to_the_file_errors_and_our_progress_stay():
    p = subprocess.run([sys.executable, "-W", "always", "-c", ROUTED], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    path = p.stdout.strip().splitlines()[-1]
    logged = open(path).read()
    for line in ("ray data progress line", "Reporting training result 1", "ray warning line", "ray error line",
                 "a deprecation warning"):
        assert line in logged, line
    assert "the job's own progress" in p.stderr and "ray error line" in p.stderr
    for line in ("ray data progress line", "Reporting training result", "ray warning line", "deprecation"):
        assert line not in p.stderr, line


@pytest.mark.parametrize("argv, quiet", [([], True), (["--verbose"], False)])
def test_init_ray_keeps_worker_output_off_the_console_unless_verbose(monkeypatch, capsys, argv, quiet):
    import ray

    from jobs import cli, invert, ray_logs

    seen, routed = {}, []
    monkeypatch.setattr(cli, "install_log_redaction", lambda: None)  # (process-wide, tested elsewhere)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(ray_logs, "route_to_file", lambda: routed.append(1) or "/tmp/stbatch-logs/ray-x.log")
    monkeypatch.setattr(ray_logs, "workers_folder", lambda: "/tmp/ray/session_x/logs")
    summary = cli.main("invert", "", invert.SETTINGS, lambda cfg: {"run_id": None, "counts": {}},
                       argv=["--quiet", *argv])
    out = capsys.readouterr()
    assert seen["log_to_driver"] is (not quiet) and bool(routed) is quiet
    assert ("Ray's logs: /tmp/stbatch-logs/ray-x.log and the workers' in /tmp/ray/session_x/logs" in out.err) is quiet
    assert json.loads(out.out.strip().splitlines()[-1]) == summary  # the summary line is unchanged
