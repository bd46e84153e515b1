"""The one command-line shape every job shares.

    python -m jobs.<name> [--config FILE] [--set key.sub=value ...]

Configuration is the job's defaults, overlaid by the YAML file, overlaid by each `--set`
(values parsed as YAML, so `--set metrics=true --set ray.num_cpus=2` do what they say).
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
from typing import Callable

import yaml

log = logging.getLogger("stbatch")

RAY_DEFAULTS = {
    "address": None,  # None: a local Ray; "auto" on a cluster (ray job submit sets RAY_ADDRESS)
    "num_cpus": None,
    "num_gpus": None,
}


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def set_dotted(cfg: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise SystemExit(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    node = cfg
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise SystemExit(f"--set {key}: {p} is not a section")
    node[parts[-1]] = value


def load_config(defaults: dict, config_file: str | None, sets: list[str]) -> dict:
    cfg = deep_merge({"ray": RAY_DEFAULTS}, defaults)
    if config_file:
        with open(config_file) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise SystemExit(f"{config_file}: expected a mapping at the top level")
        cfg = deep_merge(cfg, data)
    for s in sets or []:
        set_dotted(cfg, s)
    return cfg


def init_ray(cfg: dict) -> None:
    import ray

    if ray.is_initialized():
        return
    rc = cfg.get("ray") or {}
    kw = {"ignore_reinit_error": True, "log_to_driver": True}
    address = rc.get("address") or os.environ.get("RAY_ADDRESS")
    if address:
        kw["address"] = address
    else:
        # "local": a new local Ray even when another cluster runs on this machine (ray.init()
        # alone would join it, and refuse num_cpus).
        kw["address"] = "local"
        for k in ("num_cpus", "num_gpus"):
            if rc.get(k) is not None:
                kw[k] = rc[k]
        # A local Ray's workers inherit this environment (S3 endpoint and credentials included);
        # credentials are never copied into a runtime_env, where the dashboard would show them.
    ray.init(**kw)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = bool(cfg.get("progress", True))
    ctx.print_on_execution_start = False


def make_parser(job: str, description: str, defaults: dict) -> argparse.ArgumentParser:
    epilog = "defaults (override with --config FILE or --set key=value):\n" + yaml.safe_dump(
        deep_merge({"ray": RAY_DEFAULTS}, defaults), sort_keys=False, default_flow_style=False)
    p = argparse.ArgumentParser(prog=f"python -m jobs.{job}", description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML file overlaid on the defaults")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="sets",
                   help="override one setting (dotted key, YAML value); repeatable")
    p.add_argument("--quiet", action="store_true", help="no progress bars, only the summary line")
    return p


def summary_line(job: str, run_id: str | None, counts: dict, seconds: float, extra: dict | None = None) -> dict:
    out = {"job": job, "run_id": run_id, "in": int(counts.get("in", 0)), "ok": int(counts.get("ok", 0)),
           "failed": int(counts.get("failed", 0)), "skipped": int(counts.get("skipped", 0)),
           "seconds": round(seconds, 2)}
    out.update(extra or {})
    return out


def main(job: str, description: str, defaults: dict, run: Callable[[dict], dict],
         argv: list[str] | None = None, use_ray: bool = True) -> dict:
    """Parse arguments, start Ray, call `run(cfg)` and print its summary as one JSON line.

    `run` returns a dict with at least `run_id` and `counts` (`in`, `ok`, `failed`, `skipped`);
    anything under `extra` is added to the summary."""
    args = make_parser(job, description, defaults).parse_args(argv)
    cfg = load_config(defaults, args.config, args.sets)
    if args.quiet:
        cfg["progress"] = False
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    t0 = time.time()
    if use_ray:
        init_ray(cfg)
    result = run(cfg)
    counts = result["counts"]
    if counts.get("in", 0) != counts.get("ok", 0) + counts.get("failed", 0) + counts.get("skipped", 0):
        log.error("accounting mismatch: %s", counts)
    summary = summary_line(job, result.get("run_id"), counts, time.time() - t0, result.get("extra"))
    print(json.dumps(summary, default=str), flush=True)
    return summary
