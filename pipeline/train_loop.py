"""Encoder training on Ray Train: the per-worker loop, its data stage and resumable checkpoints.

Checkpoints live in object storage, not on a worker's disk, so a restarted job on any node
resumes from the newest one:

    <output>/checkpoints/step_000200.pt        the model, official inversion layout
    <output>/checkpoints/state_000200.pt       optimiser state + step (weights_only loadable),
                                               written last: it completes the checkpoint
    <output>/train/log.jsonl                   one line per logged step
    <output>/train/grids/step_000200.png       validation grid: inputs over reconstructions
"""
from __future__ import annotations

import io
import json
import logging
import re
import time

import numpy as np
import torch

from pipeline import storage
from pipeline.decode import decode_image
from pipeline.images import to_model_input
from pipeline.sections import MetricWeights
from pipeline.status import STATUS_OK
from pipeline.train_sections import EncoderModelSection, TrainEncoderSection

log = logging.getLogger("stbatch.train")

_STEP = re.compile(r"step_(\d+)\.pt")
_STATE = re.compile(r"state_(\d+)\.pt")


def decode_for_training(batch: dict, input_size: int, target_size: int) -> dict:
    """(path, bytes) -> encoder input and target; undecodable files get a status and are
    dropped by the loop (and counted by the job's check pass)."""
    n = len(batch["bytes"])
    image = np.zeros((n, 3, input_size, input_size), np.float32)
    target = np.zeros((n, 3, target_size, target_size), np.float32)
    ok = np.zeros(n, bool)
    err = np.array([None] * n, dtype=object)
    for i, b in enumerate(batch["bytes"]):
        d = decode_image(bytes(b), min_side=1)
        if d.status == STATUS_OK:
            if d.image is None:  # decode_image sets the image with status ok
                raise ValueError("decode_image: status ok without an image")
            image[i], target[i], ok[i] = to_model_input(d.image, input_size), to_model_input(d.image, target_size), True
        else:
            err[i] = d.error
    return {"path": batch["path"], "image": image, "target": target, "ok": ok, "error": err}


def checkpoint_steps(output: str) -> list[int]:
    """The steps with a complete checkpoint: both the model file and its state file exist.
    A model file alone is what a process killed between the two writes leaves behind; it is
    never resumed from (the next run writes that step again). Temporary names of interrupted
    writes (`*.pt.tmp-*`) match neither pattern."""
    fs, root = storage.url_to_fs(storage.join(output, "checkpoints"))
    if not fs.exists(root):
        return []
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    models = {int(m.group(1)) for m in map(_STEP.fullmatch, names) if m}
    states = {int(m.group(1)) for m in map(_STATE.fullmatch, names) if m}
    return sorted(models & states)


def save_checkpoint(output: str, model, optimizer, step: int, opts: dict) -> str:
    """Two whole-object writes (storage.write_bytes: a temporary name and a rename on a local
    disk, one PUT on S3), the model file first and the state file second. The order matters:
    the state file is what completes a checkpoint, so it may exist only once the model file is
    whole on storage. Written first, it would make a half checkpoint look complete: on a store
    without atomic writes, a kill during the model write leaves a model file cut short beside
    a state file, and the next run would resume from it."""
    from stmodel.checkpoint import save_inversion

    uri = storage.join(output, "checkpoints", f"step_{step:06d}.pt")
    save_inversion(model, uri, opts={**opts, "step": step})
    buf = io.BytesIO()
    torch.save({"step": step, "optimizer": optimizer.state_dict()}, buf)
    storage.write_bytes(storage.join(output, "checkpoints", f"state_{step:06d}.pt"), buf.getvalue())
    return uri


def load_state(output: str, step: int) -> dict:
    from stmodel.checkpoint import load_bytes

    uri = storage.join(output, "checkpoints", f"state_{step:06d}.pt")
    return load_bytes(storage.read_bytes(uri), uri)


def read_log(output: str, upto: int | None = None) -> list[dict]:
    uri = storage.join(output, "train", "log.jsonl")
    fs, path = storage.url_to_fs(uri)
    if not fs.exists(path):
        return []
    rows = [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]
    return [r for r in rows if upto is None or r["step"] <= upto]


def write_log(output: str, rows: list[dict]) -> None:
    storage.write_bytes(storage.join(output, "train", "log.jsonl"),
                        "".join(json.dumps(r) + "\n" for r in rows).encode())


def image_grid(rows: list[torch.Tensor]) -> np.ndarray:
    """Rows of [N, 3, S, S] images in [-1, 1] (same S) -> one uint8 HxWx3 grid."""
    from pipeline.scoring import to_uint8

    return np.concatenate([np.concatenate(list(to_uint8(r)), axis=1) for r in rows], axis=0)


def build_model(spec: EncoderModelSection):
    """The model training starts from: an inversion checkpoint, or a pretrained StyleGAN2 file
    (`generator` + `preset`) around a fresh seeded encoder, or (demo/tests) a seeded preset."""
    from pipeline.models import load_model
    from stmodel.checkpoint import inversion_from_generator, load_generator

    if spec.checkpoint or not spec.generator:
        model, _ = load_model(spec)
        return model
    if not spec.preset:  # EncoderModelSection.problems refuses this
        raise ValueError("model.generator needs model.preset (the generator's shape)")
    gen, avg, _ = load_generator(spec.generator, spec.preset, sha256=spec.generator_sha256)
    return inversion_from_generator(gen, avg, seed=spec.seed)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: DDP across workers; rank 0 logs, writes grids and checkpoints. Config:
    `output`, `model` (an EncoderModelSection), `metric_weights` (a MetricWeights), `train` (a
    TrainEncoderSection), `val` (validation images and targets, or None)."""
    import ray.train
    import ray.train.torch

    from stmodel.losses import LossWeights, PSPLoss

    t: TrainEncoderSection = config["train"]
    output: str = config["output"]
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(t.seed + rank)
    if t.torch_threads:
        torch.set_num_threads(t.torch_threads)
    device = ray.train.torch.get_device()
    model = build_model(config["model"])
    steps_done = checkpoint_steps(output) if t.resume else []
    start = steps_done[-1] if steps_done else 0
    if start:
        from stmodel.checkpoint import load_inversion

        model, _ = load_inversion(storage.join(output, "checkpoints", f"step_{start:06d}.pt"))
    # Trained: the encoder and the mapping net (queries come from it); synthesis frozen.
    model.requires_grad_(False)
    model.encoder.requires_grad_(True)
    model.decoder.style.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=t.lr)
    if start:
        optimizer.load_state_dict(load_state(output, start)["optimizer"])
    model.to(device)
    model.train()
    model.decoder.eval()  # no train-mode behaviour there, and keep it frozen
    world = ray.train.get_context().get_world_size()
    ddp = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    lpips_net = id_embed = None
    if t.lpips > 0 or t.id > 0:
        from pipeline.models import build_metrics

        weights: MetricWeights = config["metric_weights"]
        lp, ident = build_metrics(weights, device)
        lpips_net = (lambda a, b: lp.net(a, b, normalize=False).flatten()) if t.lpips > 0 else None
        id_embed = (lambda x: ident.net(ident.preprocess(x))) if t.id > 0 else None
    loss_fn = PSPLoss(LossWeights(t.l2, t.lpips, t.id, t.w_norm), lpips_net, id_embed)
    val = config["val"]
    logs = read_log(output, upto=start) if rank == 0 else []
    shard = ray.train.get_dataset_shard("train")
    step, t0 = start, time.time()
    total = t.steps
    while step < total:
        for batch in shard.iter_torch_batches(batch_size=t.batch_size, dtypes=torch.float32,
                                              device=str(device)):
            x, y = batch["image"], batch["target"]
            y_hat, w = ddp(x)
            loss, parts = loss_fn(y_hat, y, w, model.latent_avg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            logged = step % t.log_every == 0 or step == total
            if rank == 0 and logged:
                logs.append({"step": step, **{k: round(v, 6) for k, v in parts.items()},
                             "seconds": round(time.time() - t0, 2)})
                write_log(output, logs)
                log.info("step %d/%d %s", step, total, " ".join(f"{k}={v:.4f}" for k, v in parts.items()))
            if rank == 0 and val is not None and (step % t.val_every == 0 or step == total):
                _write_grid(model, val, output, step)
            if rank == 0 and (step % t.checkpoint_every == 0 or step == total):
                save_checkpoint(output, model, optimizer, step, {"trained_by": "jobs.train_encoder"})
            if logged:  # a report is a sync point with the controller: not every step
                ray.train.report({"step": step, **parts})
            if step >= total:
                break


@torch.no_grad()
def _write_grid(model, val: dict, output: str, step: int) -> None:
    from pipeline.images import encode_png

    was = model.training
    model.eval()
    x = torch.from_numpy(val["image"][:8])
    y = torch.from_numpy(val["target"][:8])
    rec = model.reconstruct(model.invert(x))
    storage.write_bytes(storage.join(output, "train", "grids", f"step_{step:06d}.png"),
                        encode_png(image_grid([y, rec.clamp(-1, 1)])))
    model.train(was)
    model.decoder.eval()
