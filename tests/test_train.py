"""Encoder training on Ray Train: real crashes (SIGKILL) and the resume that follows.

The job runs as `python -m jobs.train_encoder` in its own process group, with its own local Ray,
so a kill takes the driver, the Ray Train worker and everything else down at once, as a lost
node or an OOM kill would: no exception handler, no `finally`, no manifest."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch

from jobs.demo import build_generator, sample_dataset
from pipeline.train_loop import checkpoint_steps, load_state, read_log
from stmodel.checkpoint import load_inversion, save_generator
from tests.conftest import kill_tagged

STEPS, EVERY = 12, 3

# Loaded by every Python process of a run through PYTHONPATH (the Ray Train worker included):
# the first time the model file named in STBATCH_TEST_FAULT is written, write it whole, then
# SIGKILL the writing process, i.e. between the model file and its state file. The marker file
# makes it fire once. No hook in production code: the one write function is wrapped before any
# module imports it.
SITECUSTOMIZE = r'''
import json, os, signal
import stmodel.uri

_fault = json.loads(os.environ["STBATCH_TEST_FAULT"])
_write_bytes = stmodel.uri.write_bytes


def write_bytes(uri, data):
    if os.path.basename(uri) == _fault["file"] and not os.path.exists(_fault["marker"]):
        open(_fault["marker"], "w").close()
        _write_bytes(uri, data)
        os.kill(os.getpid(), signal.SIGKILL)
    return _write_bytes(uri, data)


stmodel.uri.write_bytes = write_bytes
'''


def _command(root: str) -> list[str]:
    sets = [f"input={root}/synthetic/train", f"val_input={root}/synthetic/val", f"output={root}/run",
            f"val_codes={root}/synthetic_meta/codes.parquet", f"model.generator={root}/models/generator.pt",
            "model.preset=tiny-32", "train_encoder.lpips=0", "train_encoder.id=0", f"train_encoder.steps={STEPS}",
            "train_encoder.batch_size=4", "train_encoder.lr=0.001", "train_encoder.log_every=1",
            f"train_encoder.val_every={EVERY}", f"train_encoder.checkpoint_every={EVERY}", "train_encoder.val_images=4",
            f"train_encoder.ray_storage={root}/ray_results", "ray.num_cpus=2"]
    return [sys.executable, "-m", "jobs.train_encoder", "--quiet"] + [a for s in sets for a in ("--set", s)]


def _start(root: str, name: str, fault: dict | None = None) -> subprocess.Popen:
    """The job in its own process group; stdout / stderr go to `<root>/logs/<name>.*` (files, not
    pipes: nothing the kill leaves behind can hold them open)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
           "STBATCH_TEST_TREE": f"{name}-{uuid.uuid4().hex}"}
    env.pop("RAY_ADDRESS", None)
    if fault:
        folder = os.path.join(root, "fault")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "sitecustomize.py"), "w") as f:
            f.write(SITECUSTOMIZE)
        env["PYTHONPATH"] = os.pathsep.join([folder] + [p for p in [env.get("PYTHONPATH")] if p])
        env["STBATCH_TEST_FAULT"] = json.dumps(fault)
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    logs = os.path.join(root, "logs", name)
    with open(f"{logs}.out", "w") as o, open(f"{logs}.err", "w") as e:
        proc = subprocess.Popen(_command(root), cwd=root, env=env, stdout=o, stderr=e, start_new_session=True)
    proc.tag = env["STBATCH_TEST_TREE"]
    return proc


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the run's process group, then any process of the run that left the group (found by
    the tag in its environment)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    kill_tagged(proc.tag)


def _finish(proc: subprocess.Popen, root: str, name: str, timeout: float = 900) -> tuple[str, str]:
    """Wait for the driver, then kill whatever of its run is left (nothing, normally)."""
    try:
        proc.wait(timeout)
    finally:
        _kill_tree(proc)
        proc.wait(60)
    return tuple(open(os.path.join(root, "logs", f"{name}.{x}")).read() for x in ("out", "err"))


def _steps(rows: list[dict]) -> list[int]:
    return [r["step"] for r in rows]


@pytest.mark.slow
def test_sigkill_mid_run_and_between_model_and_state_then_resume(tmp_path):
    root = str(tmp_path)
    out = f"{root}/run"
    ckpts = tmp_path / "run" / "checkpoints"
    g = build_generator("tiny-32", 0)
    save_generator(g, f"{root}/models/generator.pt", latent_avg=g.mean_latent(2000))
    sample_dataset(g, root, n_train=16, n_val=4, truncation=0.7, seed=0)

    # 1. SIGKILL to the whole process group as soon as the first checkpoint is complete (a state
    # file published, not one still being written under its temporary name)
    proc = _start(root, "run1")
    try:
        deadline = time.time() + 900
        def published() -> bool:
            return ckpts.is_dir() and any(p.name.startswith("state_") and ".tmp-" not in p.name
                                          for p in ckpts.iterdir())

        while not published():
            assert proc.poll() is None and time.time() < deadline, "no checkpoint before the job ended"
            time.sleep(0.02)
    finally:
        _kill_tree(proc)
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    done1 = checkpoint_steps(out)
    assert done1, "a state file is on storage, yet no checkpoint is complete: was it written before its model?"
    log1 = read_log(out)
    k1, last1 = done1[-1], log1[-1]["step"]
    assert k1 < STEPS and _steps(log1) == list(range(1, last1 + 1))  # killed mid-run
    assert k1 <= last1 <= k1 + EVERY  # steps k1+1..last1 are done again: at most one interval
    assert not (tmp_path / "run" / "_runs").exists() and not (tmp_path / "run" / "train" / "eval.json").exists()

    # 2. the rerun resumes from k1; its worker is SIGKILLed once the next model file is written,
    # before its state file
    t = k1 + EVERY
    marker = f"{root}/fault_fired"
    proc = _start(root, "run2", {"file": f"step_{t:06d}.pt", "marker": marker})
    _, err = _finish(proc, root, "run2")
    assert os.path.exists(marker) and proc.returncode != 0, err[-4000:]
    assert f"(resuming from {k1})" in err
    assert (ckpts / f"step_{t:06d}.pt").exists() and not (ckpts / f"state_{t:06d}.pt").exists()
    assert checkpoint_steps(out) == done1  # the model file alone is not a checkpoint
    log2 = read_log(out)
    assert _steps(log2) == list(range(1, t + 1))
    assert log2[:k1] == log1[:k1]  # kept as they were: nothing before k1 was trained again
    assert not (tmp_path / "run" / "_runs").exists()

    # 3. the same command again resumes from k1 (not from the half checkpoint at t) and finishes
    proc = _start(root, "run3")
    stdout, err = _finish(proc, root, "run3")
    assert proc.returncode == 0, err[-4000:]
    assert f"(resuming from {k1})" in err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["steps"] == STEPS and (summary["in"], summary["ok"], summary["failed"]) == (16, 16, 0)
    assert checkpoint_steps(out) == list(range(EVERY, STEPS + 1, EVERY))
    log3 = read_log(out)
    assert _steps(log3) == list(range(1, STEPS + 1)) and log3[:k1] == log1[:k1]
    for s in checkpoint_steps(out):  # every checkpoint whole and consistent
        model, info = load_inversion(f"{out}/checkpoints/step_{s:06d}.pt")
        assert info.opts["step"] == s and load_state(out, s)["step"] == s
    first, _ = load_inversion(f"{out}/checkpoints/step_{EVERY:06d}.pt")
    moved = sum(float((a - b).detach().abs().sum())
                for a, b in zip(first.encoder.parameters(), model.encoder.parameters()))
    assert moved > 0  # training went on from the checkpoint
    assert torch.equal(first.decoder.convs[0].conv.weight, model.decoder.convs[0].conv.weight)  # synthesis frozen
    ev = json.loads((tmp_path / "run" / "train" / "eval.json").read_text())
    assert set(ev) == {"trained", "untrained", "mean_latent"} and "w_mse" in ev["trained"]
    assert sorted(p.name for p in (tmp_path / "run" / "train" / "grids").iterdir()) == [
        f"step_{s:06d}.png" for s in range(EVERY, STEPS + 1, EVERY)]
    runs = list((tmp_path / "run" / "_runs").iterdir())
    assert len(runs) == 1 and json.loads(runs[0].read_text())["run_id"] == summary["run_id"]


def test_checkpoint_steps_counts_only_complete_pairs(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    for name in ["step_000003.pt", "state_000003.pt",   # complete
                 "step_000006.pt",                      # killed between the two writes
                 "state_000009.pt",                     # a state file alone
                 "step_000012.pt.tmp-1a2b3c4d", "state_000012.pt"]:  # a model write cut short
        (d / name).write_bytes(b"x")
    assert checkpoint_steps(str(tmp_path)) == [3]


def test_train_settings_ranges_rules_and_preflight(tmp_path):
    """No Ray: a generator without its shape, out-of-range settings and a missing input stop the
    job before it starts."""
    from jobs import train_encoder
    from jobs.cli import load_config
    from pipeline.config import SettingsError

    with pytest.raises(SettingsError) as e:
        load_config(train_encoder.SETTINGS, None, ["model.generator=g.pt", "train_encoder.lpips=-1",
                                                   "train_encoder.checkpoint_every=0"])
    assert sorted(m.split(":")[0] for m in e.value.errors) == ["model.generator", "train_encoder.checkpoint_every",
                                                               "train_encoder.lpips"]
    cfg = load_config(train_encoder.SETTINGS, None, [f"input={tmp_path}/none", "val_input=" + str(tmp_path)])
    assert [m.split(":")[0] for m in train_encoder.check(cfg)] == ["input", "output"]
