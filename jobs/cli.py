"""The one command-line shape every job shares.

    python -m jobs.<name> [--config FILE] [--set key.sub=value ...]

Configuration is the job's settings class (defaults and types, jobs.settings), overlaid by the
YAML file, overlaid by each `--set` (values parsed as YAML, so `--set metrics=true --set
ray.num_cpus=2` do what they say). All of it is checked before anything else happens (no Ray,
nothing read or written under `output`): an unknown key or a value of the wrong type prints
every problem to stderr and exits with status 2.

Config files may serve several jobs (configs/ffhq.yaml holds align, invert, evaluate and
train_encoder sections): a key of a config file that another job of this project knows, and
this one does not, is ignored by this job; a key that no job knows is an error, at the top
level and inside any section. `--set` must name a setting of the job being run.

The job prints progress to stderr and, at the end, one JSON line on stdout:
`{"job", "run_id", "in", "ok", "failed", "skipped", "seconds", ...}`.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, Callable, TypeVar

import yaml

from jobs import ray_logs
from jobs.settings import SETTINGS
from pipeline.compute import NoRoomForTasks
from pipeline.config import SettingsError, describe, known_keys, parse, unknown_message
from pipeline.errors import JobError
from pipeline.redact import install_log_redaction, redact_config, redact_text
from pipeline.sections import JobSettings, ModelSection

log = logging.getLogger("stbatch")
S = TypeVar("S", bound=JobSettings)


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), (dict, bool)):
            out[k] = deep_merge(_as_section(out[k]), v)
        elif isinstance(v, bool) and isinstance(out.get(k), dict):
            out[k] = {**out[k], "enabled": v}
        else:
            out[k] = copy.deepcopy(v)
    return out


def _as_section(value: dict | bool) -> dict:
    """A switch that may also be given as its section (`paste_back=true`, then
    `paste_back.group=photo`): the bool becomes the section's `enabled`, so neither order of
    the two settings loses the other."""
    return value if isinstance(value, dict) else {"enabled": value}


def set_dotted(cfg: dict, assignment: str) -> None:
    """Apply one `key.sub=value` (value parsed as YAML) to `cfg`; raises SettingsError."""
    if "=" not in assignment:
        raise SettingsError([f"--set expects key=value, got {assignment!r}"])
    key, raw = assignment.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise SettingsError([f"--set {key}: the value {raw!r} is not valid YAML ({str(e).splitlines()[0]})"]) from None
    node = cfg
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        if isinstance(node.get(p), bool):
            node[p] = _as_section(node[p])
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise SettingsError([f"--set {key}: {'.'.join(parts[:i + 1])} is set to a value, not a section"])
    if isinstance(value, bool) and isinstance(node.get(parts[-1]), dict):
        node[parts[-1]] = {**node[parts[-1]], "enabled": value}
    else:
        node[parts[-1]] = value


def other_jobs_keys(job_settings: type) -> list[dict]:
    """The setting-name trees of the other jobs a config file may be shared with."""
    return [known_keys(cls) for cls in SETTINGS.values() if cls is not job_settings]


def for_this_job(data: Mapping, mine: dict | None, others: list[dict], path: str, errors: list[str]) -> dict:
    """A config file's mapping, less what only other jobs know (whose keys are still checked
    against those jobs' settings); unknown keys go to `errors`."""
    out = {}
    for k, v in data.items():
        k = str(k)
        key = f"{path}.{k}" if path else k
        theirs = [o[k] for o in others if isinstance(o.get(k), dict)]
        if mine is not None and k in mine:
            if mine[k] is not None and isinstance(v, Mapping):
                out[k] = for_this_job(v, mine[k], theirs, key, errors)
            else:
                out[k] = v  # a value, or a wrong type that parse names
        elif any(k in o for o in others):
            if theirs and isinstance(v, Mapping):
                for_this_job(v, None, theirs, key, errors)  # another job's section: checked, not kept
        else:
            names = list(mine or {}) + sorted({n for o in others for n in o} - set(mine or {}))
            errors.append(unknown_message(path, k, names))
    return out


def read_config_file(path: str, settings: type) -> dict:
    """The part of a YAML config file that concerns the job of `settings`; raises SettingsError."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise SettingsError([f"--config {path}: {e.strerror or e}"]) from None
    except yaml.YAMLError as e:
        raise SettingsError([f"--config {path}: not valid YAML: {e}"]) from None
    if not isinstance(data, Mapping):
        raise SettingsError([f"--config {path}: expected a mapping at the top level"])
    errors: list[str] = []
    out = for_this_job(data, known_keys(settings), other_jobs_keys(settings), "", errors)
    if errors:
        raise SettingsError([f"--config {path}: {m}" for m in errors])
    return out


def load_config(settings: type[S], config_file: str | None, sets: list[str]) -> S:
    """The job's validated settings object: defaults of `settings`, overlaid by the
    config file (see the module doc for keys of other jobs), overlaid by each `--set`. Raises
    SettingsError with every problem found."""
    errors: list[str] = []
    data: dict = {}
    if config_file:
        try:
            data = read_config_file(config_file, settings)
        except SettingsError as e:
            errors += e.errors
    overlay: dict = {}
    for s in sets or []:
        try:
            set_dotted(overlay, s)
        except SettingsError as e:
            errors += e.errors
    try:
        cfg = parse(settings, deep_merge(data, overlay))
    except SettingsError as e:
        raise SettingsError(errors + e.errors) from None
    if errors:
        raise SettingsError(errors)
    return cfg


def init_ray(cfg: JobSettings, trains: bool = False) -> None:
    """Connect to `ray.address` (or RAY_ADDRESS), or start a local Ray. `trains`: the job runs
    Ray Train, whose controller a local Ray's dashboard must serve (`ray.dashboard: auto`).
    Unless `verbose`, Ray's own logs go to a file whose path is printed (jobs.ray_logs)."""
    import ray
    from ray.data import DataContext

    if ray.is_initialized():
        return
    verbose = cfg.verbose
    log_file = None if verbose else ray_logs.route_to_file()
    rc = cfg.ray
    # the workers' stdout / stderr (Ray Train's per-step reports) stay in their own files
    kw: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": verbose}
    address = rc.address or os.environ.get("RAY_ADDRESS")
    if address:
        kw["address"] = address
    else:
        # "local": a new local Ray even when another cluster runs on this machine (ray.init()
        # alone would join it, and refuse num_cpus).
        kw["address"] = "local"
        for k, v in (("num_cpus", rc.num_cpus), ("num_gpus", rc.num_gpus),
                     ("object_store_memory", rc.object_store_memory)):
            if v is not None:
                kw[k] = v
        # Ray's own guard: spilling stops (OutOfDiskError) once the disk is this full; the job
        # then ends with `out_of_disk_message`, never with a full disk.
        os.environ["RAY_local_fs_capacity_threshold"] = str(rc.spill_disk_limit)
        # The dashboard and its metrics polling take CPU from the model on a small machine
        # (bench.invert_pipeline --dashboard); a cluster keeps its own.
        kw["include_dashboard"] = trains if rc.dashboard == "auto" else rc.dashboard
        # A local Ray's workers inherit this environment (S3 endpoint and credentials included);
        # credentials are never copied into a runtime_env, where the dashboard would show them.
    # the workers' log records are redacted as the driver's are (merged with a submitted job's env)
    kw["runtime_env"] = {"worker_process_setup_hook": "pipeline.redact.install_log_redaction"}
    ray.init(**kw)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    ctx.print_on_execution_start = False
    if log_file:
        workers = ray_logs.workers_folder()
        print(f"Ray's logs: {log_file}" + (f" and the workers' in {workers}" if workers else "")
              + " (--verbose prints them here)", file=sys.stderr, flush=True)


def make_parser(job: str, description: str, settings: type) -> argparse.ArgumentParser:
    epilog = ("settings (--config FILE or --set key=value; a config file may hold other jobs' sections,\n"
              "which this job ignores; an unknown key or a wrong type stops the job before it starts):\n"
              + describe(settings))
    p = argparse.ArgumentParser(prog=f"python -m jobs.{job}", description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML file overlaid on the defaults")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="sets",
                   help="override one setting (dotted key, YAML value); repeatable")
    p.add_argument("--quiet", action="store_true", help="no progress bars, only the summary line")
    p.add_argument("--verbose", action="store_true",
                   help="Ray's and Ray Train's own logs on the console (default: in a log file whose path is printed)")
    return p


def summary_line(job: str, run_id: str | None, counts: dict, seconds: float, extra: dict | None = None) -> dict:
    out = {"job": job, "run_id": run_id, "in": int(counts.get("in", 0)), "ok": int(counts.get("ok", 0)),
           "failed": int(counts.get("failed", 0)), "skipped": int(counts.get("skipped", 0)),
           "seconds": round(seconds, 2)}
    out.update(extra or {})
    return out


def input_errors(key: str, uri: str | None) -> list[str]:
    """A scheduled job's input root must exist: a typo in a cron line is an error, not a run
    over nothing (an existing empty root is a run of 0 inputs)."""
    if not uri:
        return [f"{key}: set {key}=URI"]
    from pipeline import storage

    try:
        fs, path = storage.url_to_fs(uri)
        if fs.exists(path):
            return []
    except Exception as e:  # noqa: BLE001 - an unreachable store is as fatal as a missing root
        return [f"{key}: cannot reach {uri}: {type(e).__name__}: {e}"]
    return [f"{key}: {uri} does not exist (nothing was run; an empty folder would be a run over 0 inputs)"]


def model_errors(key: str, spec: ModelSection) -> list[str]:
    """A model section needs a checkpoint (or, for tests and the demo, a seeded preset)."""
    if spec.checkpoint or spec.preset:
        return []
    return [f"{key}.checkpoint: set {key}.checkpoint=URI (the Style Transformer checkpoint), or {key}.preset=NAME "
            f"for a seeded random model"]


def is_out_of_disk(e: BaseException) -> bool:
    """Whether `e` (or what it wraps: Ray Data re-raises a task's error) is Ray's refusal to
    spill past `ray.spill_disk_limit`."""
    from ray.exceptions import OutOfDiskError

    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OutOfDiskError) or "OutOfDiskError" in type(cur).__name__:
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def out_of_disk_message(job: str, cfg: JobSettings) -> str:
    limit = cfg.ray.spill_disk_limit
    return (f"python -m jobs.{job}: stopped: Ray's object store needed to spill to local disk past "
            f"ray.spill_disk_limit={limit} of the disk. Nothing was committed (a rerun does the work). Give the "
            f"object store more memory (ray.object_store_memory), lower the batch / block sizes, free disk, or "
            f"raise the limit.")


def main(job: str, description: str, settings: type[S], run: Callable[[S], dict],
         argv: list[str] | None = None, use_ray: bool = True, trains: bool = False,
         check: Callable[[S], list[str]] | None = None) -> dict:
    """Parse arguments and check the settings (exit 2 on any problem, before anything is
    touched), start Ray, call `run(cfg)` and print its summary as one JSON line.

    `run` returns a dict with at least `run_id` and `counts` (`in`, `ok`, `failed`, `skipped`);
    anything under `extra` is added to the summary. `trains`: the job runs Ray Train. `check(cfg)`:
    the job's own checks of what the settings name (inputs that must exist...), run before Ray
    starts; its messages are settings errors."""
    args = make_parser(job, description, settings).parse_args(argv)
    try:
        cfg = load_config(settings, args.config, args.sets)
        if check is not None and (errors := check(cfg)):
            raise SettingsError(errors)
    except SettingsError as e:
        print(f"python -m jobs.{job}: invalid settings, nothing was run:", file=sys.stderr)
        for m in e.errors:
            print(f"  {redact_text(m)}", file=sys.stderr)
        sys.stderr.flush()
        raise SystemExit(2) from None
    if args.quiet:
        cfg.progress = False
    if args.verbose:
        cfg.verbose = True
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    install_log_redaction()
    t0 = time.time()
    if use_ray:
        init_ray(cfg, trains=trains)
    try:
        result = run(cfg)
    except SystemExit as e:  # a job's stop message may quote a URI
        raise SystemExit(redact_text(e.code) if isinstance(e.code, str) else e.code) from None
    except JobError as e:
        print(f"python -m jobs.{job}: stopped: {redact_text(str(e))}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except NoRoomForTasks as e:  # the cluster cannot run the pipeline as set: say so, never hang
        print(f"python -m jobs.{job}: stopped: {e}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None
    except Exception as e:
        if not is_out_of_disk(e):
            raise
        print(out_of_disk_message(job, cfg), file=sys.stderr, flush=True)
        raise SystemExit(3) from None
    counts = result["counts"]
    if counts.get("in", 0) != counts.get("ok", 0) + counts.get("failed", 0) + counts.get("skipped", 0):
        log.error("accounting mismatch: %s", counts)
    summary = summary_line(job, result.get("run_id"), counts, time.time() - t0, result.get("extra"))
    summary = redact_config(summary)
    print(json.dumps(summary, default=str), flush=True)
    return summary
