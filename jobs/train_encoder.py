"""Train job: the Style Transformer encoder (and the mapping net; synthesis frozen) with the
pSp objective, on Ray Train (TorchTrainer, data parallel; one CPU worker locally).

    python -m jobs.train_encoder --set input=URI --set output=URI \\
        --set model.generator=s3://models/stylegan2-ffhq-config-f.pt --set model.preset=ffhq-1024 \\
        --set metric_weights.lpips_alexnet=URI --set metric_weights.facenet=URI

`input` is a folder of aligned face images (any fsspec URI). The job first checks every file
(undecodable ones are reported and counted as failed, never trained on), then trains for
`train_encoder.steps` steps, writing the model in the official checkpoint layout to
`<output>/checkpoints/` every `train_encoder.checkpoint_every` steps, a loss log to
`<output>/train/log.jsonl` and validation grids to `<output>/train/grids/`. Rerunning the
same command after a crash resumes from the newest complete checkpoint and stops at the same
step count. At the end it evaluates on the validation images: reconstruction PSNR / MSE of the
trained encoder against its untrained self and the mean-latent baseline (and, given
`val_codes` with true codes, the W+ error), written to `<output>/train/eval.json`.

Loss weights default to the official face values (l2 1.0, lpips 0.8, id 0.1, w_norm 0); LPIPS
and ID need their backbone weights in `metric_weights` (or set their weight to 0).
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np
import torch

from jobs.cli import input_errors, main
from jobs.settings.train_encoder import Settings
from pipeline import storage
from pipeline.compute import fit, use_gpu
from pipeline.errors import JobError
from pipeline.runner import JobRun
from pipeline.train_loop import (
    build_model,
    checkpoint_steps,
    decode_for_training,
    train_loop_per_worker,
)

log = logging.getLogger("stbatch.train")

JOB = "train_encoder"


SETTINGS = Settings


def _decode_all(files: list[str], input_size: int, target_size: int) -> dict:
    """Driver-side decode of a few images (validation)."""
    batch = {"path": np.array(files, dtype=object), "bytes": [storage.read_bytes(f) for f in files]}
    out = decode_for_training(batch, input_size, target_size)
    keep = out["ok"]
    return {"image": out["image"][keep], "target": out["target"][keep],
            "names": [os.path.basename(f) for f, k in zip(files, keep) if k]}


@torch.no_grad()
def evaluate_encoder(trained, untrained, val: dict, true_w: np.ndarray | None) -> dict:
    """Reconstruction quality of the trained encoder vs its untrained self vs the mean latent."""
    from stmodel.metrics import mse, psnr, summarize

    x, y = torch.from_numpy(val["image"]), torch.from_numpy(val["target"])
    out = {}
    for name, model in (("trained", trained), ("untrained", untrained)):
        model.eval()
        w = model.invert(x)
        rec = model.reconstruct(w)
        out[name] = {"psnr": summarize(psnr(rec, y))["mean"], "mse": summarize(mse(rec, y))["mean"]}
        if true_w is not None:
            out[name]["w_mse"] = float((w - torch.from_numpy(true_w)).pow(2).mean())
    avg = trained.latent_avg[: trained.n_latent].expand(len(x), -1, -1)
    rec = trained.reconstruct(avg)
    out["mean_latent"] = {"psnr": summarize(psnr(rec, y))["mean"], "mse": summarize(mse(rec, y))["mean"]}
    if true_w is not None:
        out["mean_latent"]["w_mse"] = float((avg - torch.from_numpy(true_w)).pow(2).mean())
    return out


def _true_codes(uri: str | None, names: list[str]) -> np.ndarray | None:
    if not uri:
        return None
    import pyarrow.parquet as pq

    from pipeline.schemas import nested_list_to_numpy

    fs, path = storage.url_to_fs(uri)
    t = pq.read_table(path, filesystem=fs)
    by_name = dict(zip(t["file"].to_pylist(), nested_list_to_numpy(t["w_plus"])))
    if not all(n in by_name for n in names):
        return None
    return np.stack([by_name[n] for n in names])


def check(cfg: Settings) -> list[str]:
    """What main checks before Ray starts: the training (and validation) images exist, and an output."""
    return [*input_errors("input", cfg.input), *([] if cfg.output else ["output: set output=URI"]),
            *(input_errors("val_input", cfg.val_input) if cfg.val_input else [])]


def run(cfg: Settings) -> dict:
    """The job body (also callable from Python, after `check`)."""
    import ray

    from stmodel.checkpoint import load_inversion

    if not cfg.input or not cfg.output:
        raise JobError("train_encoder: set input=URI and output=URI")
    source, output = cfg.input, cfg.output
    t = cfg.train_encoder
    t0 = time.time()
    files = storage.list_files(source)
    if not files:
        raise JobError(f"no images under {source}")
    initial = build_model(cfg.model)
    mc = initial.cfg
    paths, fs = storage.ray_paths(source, files)
    ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs)
    ds = ds.map_batches(decode_for_training, batch_format="numpy", batch_size=32,
                        fn_kwargs={"input_size": mc.input_size, "target_size": mc.pool_size})
    # The check pass: every file accounted for before any training.
    checked = ds.select_columns(["path", "ok", "error"]).take_all()
    bad = [(r["path"], r["error"]) for r in checked if not r["ok"]]
    for p, e in bad[:20]:
        log.warning("not trainable: %s: %s", p, e)
    counts = {"in": len(files), "ok": len(checked) - len(bad), "failed": len(files) - (len(checked) - len(bad)),
              "skipped": 0}
    val_files = storage.list_files(cfg.val_input) if cfg.val_input else files
    val = _decode_all(val_files[:t.val_images], mc.input_size, mc.pool_size)
    done = checkpoint_steps(output)
    log.info("train_encoder: %d images (%d not trainable), %s, steps %d (resuming from %d), %d worker(s)%s",
             len(files), len(bad), mc.name, t.steps, done[-1] if done else 0, t.num_workers,
             " on GPU" if use_gpu(t.use_gpu) else "")
    loop_cfg = {"output": output, "model": cfg.model, "metric_weights": cfg.metric_weights, "train": t,
                "val": {"image": val["image"], "target": val["target"]}}
    fit(train_loop_per_worker, loop_cfg,
        {"train": ds.filter(lambda r: bool(r["ok"])).select_columns(["image", "target"])}, t,
        f"train_encoder-{abs(hash(output)) % 10**8}")
    steps = checkpoint_steps(output)
    last = steps[-1] if steps else 0
    checkpoint = storage.join(output, "checkpoints", f"step_{last:06d}.pt")
    extra: dict[str, Any] = {"steps": last, "checkpoint": checkpoint}
    if last >= t.steps:
        trained, _ = load_inversion(checkpoint)
        ev = evaluate_encoder(trained, initial, val, _true_codes(cfg.val_codes, val["names"]))
        storage.write_bytes(storage.join(output, "train", "eval.json"), json.dumps(ev, indent=2).encode())
        extra["eval"] = ev
        log.info("eval: trained PSNR %.2f dB, untrained %.2f dB, mean latent %.2f dB",
                 ev["trained"]["psnr"], ev["untrained"]["psnr"], ev["mean_latent"]["psnr"])
    # The run record only (`_runs/<run_id>.json`): training writes no table, so no Delta commit.
    r = JobRun(output, JOB, cfg)
    r.commit({}, {**counts, "seconds": round(time.time() - t0, 2), **extra})
    return {"run_id": r.run_id, "counts": counts, "extra": extra}


if __name__ == "__main__":
    main(JOB, __doc__, SETTINGS, run, trains=True, check=check)
