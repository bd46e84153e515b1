"""Encoder training on Ray Train: resume after a crash to the same step count."""
from __future__ import annotations

import json

import torch

from jobs import train_encoder
from jobs.cli import load_config
from jobs.demo import build_generator, sample_dataset
from pipeline.train_loop import checkpoint_steps, read_log
from stmodel.checkpoint import load_inversion, save_generator


def _cfg(root, steps, **over):
    sets = [f"input={root}/synthetic/train", f"val_input={root}/synthetic/val", f"output={root}/run",
            f"val_codes={root}/synthetic_meta/codes.parquet", f"model.generator={root}/models/generator.pt",
            "model.preset=tiny-32", "train.lpips=0", "train.id=0", f"train.steps={steps}", "train.batch_size=4",
            "train.lr=0.001", "train.log_every=1", "train.val_every=3", "train.checkpoint_every=3",
            "train.val_images=4", "progress=false"]
    return load_config(train_encoder.DEFAULTS, None, sets + [f"{k}={v}" for k, v in over.items()])


def test_resume_continues_to_the_same_step_count(ray_local, tmp_path):
    root = str(tmp_path)
    g = build_generator("tiny-32", 0)
    save_generator(g, f"{root}/models/generator.pt", latent_avg=g.mean_latent(2000))
    sample_dataset(g, root, n_train=16, n_val=4, truncation=0.7, seed=0)
    # a run "killed" after step 3 (its step-3 checkpoint is on storage, no manifest yet)
    train_encoder.run(_cfg(root, 6, **{"train.stop_after": 3}))
    assert checkpoint_steps(f"{root}/run") == [3]
    assert [r["step"] for r in read_log(f"{root}/run")] == [1, 2, 3]
    first, _ = load_inversion(f"{root}/run/checkpoints/step_000003.pt")
    # the same command again resumes from step 3 and stops at 6
    res = train_encoder.run(_cfg(root, 6))
    assert checkpoint_steps(f"{root}/run") == [3, 6]
    assert [r["step"] for r in read_log(f"{root}/run")] == [1, 2, 3, 4, 5, 6]
    assert res["extra"]["steps"] == 6 and res["counts"] == {"in": 16, "ok": 16, "failed": 0, "skipped": 0}
    last, _ = load_inversion(f"{root}/run/checkpoints/step_000006.pt")
    moved = sum(float((a - b).abs().sum()) for a, b in zip(first.encoder.parameters(), last.encoder.parameters()))
    assert moved > 0  # training went on from the checkpoint
    assert torch.equal(first.decoder.convs[0].conv.weight, last.decoder.convs[0].conv.weight)  # synthesis frozen
    ev = json.loads(open(f"{root}/run/train/eval.json").read())
    assert set(ev) == {"trained", "untrained", "mean_latent"} and "w_mse" in ev["trained"]
    assert sorted(p.name for p in (tmp_path / "run" / "train" / "grids").iterdir()) == [
        "step_000003.png", "step_000006.png"]
    # a third run has nothing left to do and keeps the step count
    train_encoder.run(_cfg(root, 6))
    assert checkpoint_steps(f"{root}/run") == [3, 6]
