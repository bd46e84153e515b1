"""Checkpoint I/O in the official layouts, from any fsspec URI.

Everything is loaded with `torch.load(weights_only=True)`: a file whose pickle would run code
is refused. Keys are mapped strictly: missing and unexpected keys are named, and a shape
mismatch names the key and both shapes.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
from torch import nn

from .config import ModelConfig, get_preset, preset_for_output_size
from .inversion import StyleTransformer
from .stylegan2 import Generator
from .uri import write_bytes

MEAN_LATENT_SAMPLES = 100_000  # z samples averaged when a StyleGAN2 file has no latent_avg
MEAN_LATENT_SEED = 0


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the model."""


@dataclass
class CheckpointInfo:
    uri: str
    sha256: str
    opts: dict = field(default_factory=dict)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_bytes(uri: str, sha256: str | None = None) -> tuple[bytes, str]:
    """Read a file from any fsspec URI; verify its sha256 when one is given."""
    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {uri}") from None
    digest = sha256_bytes(data)
    if sha256 and digest != sha256.lower():
        raise CheckpointError(f"sha256 mismatch for {uri}: expected {sha256}, file has {digest}")
    return data, digest


def load_bytes(data: bytes, source: str = "<bytes>") -> dict:
    """Unpickle a checkpoint with the safe loader; turn every failure into a readable error."""
    if not data:
        raise CheckpointError(f"{source}: file is empty")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{source}: refused by the safe loader (weights_only=True); the file holds objects "
            f"other than tensors and plain containers, which could run code: {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{source}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict checkpoint, found {type(obj).__name__}")
    return obj


def strip_prefix(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def check_strict(own: dict, state: dict, what: str) -> None:
    """Refuse `state` unless it has exactly the keys of `own` (a state_dict, possibly of meta
    tensors: only shapes are read), each a tensor of the same shape."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:12])}"
                        + (" ..." if len(missing) > 12 else ""))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:12])}"
                        + (" ..." if len(unexpected) > 12 else ""))
    for k in sorted(set(own) & set(state)):
        if not isinstance(state[k], torch.Tensor):
            problems.append(f"{k}: expected a tensor, found {type(state[k]).__name__}")
        elif tuple(own[k].shape) != tuple(state[k].shape):
            problems.append(f"shape mismatch for {k}: checkpoint has {list(state[k].shape)}, "
                            f"model expects {list(own[k].shape)}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def load_strict(module: nn.Module, state: dict, what: str) -> None:
    """Copy `state` into `module`, refusing any missing key, unexpected key or shape mismatch."""
    check_strict(module.state_dict(), state, what)
    module.load_state_dict(state, strict=True)


def generator_shapes(cfg: ModelConfig) -> dict:
    """The generator's state_dict as meta tensors (keys and shapes, no memory, no RNG draws)."""
    with torch.device("meta"):
        return Generator(cfg).state_dict()


def save_obj(obj: dict, uri: str) -> str:
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    write_bytes(uri, data)
    return sha256_bytes(data)


# ---------------------------------------------------------------- inversion checkpoints

def _config_for(opts: dict, preset: str | ModelConfig | None) -> ModelConfig:
    if isinstance(preset, ModelConfig):
        return preset
    if preset:
        return get_preset(preset)
    if "stmodel_config" in opts:  # files saved here carry their full config in opts
        return ModelConfig.from_dict(opts["stmodel_config"])
    if "output_size" in opts:
        return preset_for_output_size(int(opts["output_size"]))
    raise CheckpointError("cannot tell the model shape: no preset given and opts has no output_size")


def inversion_config(ckpt: dict, preset: str | ModelConfig | None = None) -> ModelConfig:
    """The model shape of an inversion checkpoint dict, without building the model."""
    cfg = _config_for(dict(ckpt.get("opts") or {}), preset)
    z = (ckpt.get("state_dict") or {}).get("encoder.module.z")
    if isinstance(z, torch.Tensor) and z.ndim == 3 and z.shape[1] != cfg.n_queries:
        cfg = cfg.replace(n_queries=int(z.shape[1]))
    return cfg


def inversion_from_dict(ckpt: dict, preset: str | ModelConfig | None = None,
                        source: str = "<checkpoint>", generator: bool = True) -> StyleTransformer:
    """The model of a checkpoint dict. `generator=False`: the encoder and the mapping net only
    (see StyleTransformer); the file's generator keys are still checked strictly (every key,
    every shape), only not loaded."""
    if "state_dict" not in ckpt:
        raise CheckpointError(f"{source}: no 'state_dict' (is this a plain StyleGAN2 file? use load_generator)")
    cfg = inversion_config(ckpt, preset)
    sd = ckpt["state_dict"]
    model = StyleTransformer(cfg, generator=generator)
    load_strict(model.encoder, strip_prefix(sd, "encoder.module."), f"{source} (encoder)")
    dec = strip_prefix(sd, "decoder.module.")
    if generator:
        load_strict(model.decoder, dec, f"{source} (decoder)")
    else:
        check_strict(generator_shapes(cfg), dec, f"{source} (decoder)")
        load_strict(model.decoder, {k: v for k, v in dec.items() if k.startswith("style.")}, f"{source} (decoder)")
    avg = ckpt.get("latent_avg")
    if avg is None:
        raise CheckpointError(f"{source}: no latent_avg; the official inference adds it to every code")
    avg = torch.as_tensor(avg, dtype=torch.float32)
    if avg.ndim == 1:
        avg = avg.expand(cfg.n_queries, -1)
    if avg.shape[-1] != cfg.style_dim or avg.shape[0] < cfg.n_latent:
        raise CheckpointError(f"{source}: latent_avg has shape {list(avg.shape)}, "
                              f"need at least [{cfg.n_latent}, {cfg.style_dim}]")
    la = torch.zeros(cfg.n_queries, cfg.style_dim)
    n = min(cfg.n_queries, avg.shape[0])
    la[:n] = avg[:n]
    model.latent_avg.copy_(la)
    model.latent_avg_rows = int(avg.shape[0])
    model.eval()
    return model


def load_inversion(uri: str, preset: str | ModelConfig | None = None, sha256: str | None = None,
                   generator: bool = True) -> tuple[StyleTransformer, CheckpointInfo]:
    """Load an official (or our own) Style Transformer checkpoint from any fsspec URI
    (`generator=False`: the encoder alone, see inversion_from_dict)."""
    data, digest = read_bytes(uri, sha256)
    ckpt = load_bytes(data, uri)
    model = inversion_from_dict(ckpt, preset, uri, generator=generator)
    return model, CheckpointInfo(uri=uri, sha256=digest, opts=dict(ckpt.get("opts") or {}))


def inversion_state(model: StyleTransformer, opts: dict | None = None) -> dict:
    """The official layout: DataParallel prefixes, an `opts` dict and `latent_avg` beside."""
    sd = {f"encoder.module.{k}": v.detach().cpu() for k, v in model.encoder.state_dict().items()}
    sd.update({f"decoder.module.{k}": v.detach().cpu() for k, v in model.decoder.state_dict().items()})
    o = {"output_size": model.cfg.size, "input_nc": model.cfg.input_nc, "start_from_latent_avg": True,
         "learn_in_w": False, "encoder_type": "StyleTransformer", "stmodel_config": model.cfg.to_dict()}
    o.update(opts or {})
    rows = model.latent_avg_rows
    return {"state_dict": sd, "opts": o, "latent_avg": model.latent_avg[:rows].detach().cpu().clone()}


def save_inversion(model: StyleTransformer, uri: str, opts: dict | None = None) -> str:
    """Save in the official layout; returns the file's sha256."""
    return save_obj(inversion_state(model, opts), uri)


# ---------------------------------------------------------------- plain StyleGAN2 files

def load_generator(uri: str, cfg: ModelConfig | str, sha256: str | None = None,
                   n_mean: int = MEAN_LATENT_SAMPLES) -> tuple[Generator, torch.Tensor, CheckpointInfo]:
    """Load `g_ema` from a rosinality StyleGAN2 file. Returns the generator and `latent_avg`
    `[n_latent, style_dim]`: the file's own, else the mean of the mapping net over `n_mean`
    seeded z samples (seed MEAN_LATENT_SEED)."""
    cfg = get_preset(cfg) if isinstance(cfg, str) else cfg
    data, digest = read_bytes(uri, sha256)
    ckpt = load_bytes(data, uri)
    if "g_ema" not in ckpt:
        raise CheckpointError(f"{uri}: no 'g_ema' (is this an inversion checkpoint? use load_inversion)")
    gen = Generator(cfg)
    load_strict(gen, ckpt["g_ema"], f"{uri} (g_ema)")
    gen.eval()
    avg = ckpt.get("latent_avg")
    if avg is None:
        avg = gen.mean_latent(n_mean, seed=MEAN_LATENT_SEED)
    avg = torch.as_tensor(avg, dtype=torch.float32)
    if avg.ndim == 1:
        avg = avg.unsqueeze(0).repeat(cfg.n_latent, 1)
    return gen, avg, CheckpointInfo(uri=uri, sha256=digest, opts={})


def save_generator(gen: Generator, uri: str, latent_avg: torch.Tensor | None = None) -> str:
    obj: dict[str, Any] = {"g_ema": {k: v.detach().cpu() for k, v in gen.state_dict().items()}}
    if latent_avg is not None:
        obj["latent_avg"] = latent_avg.detach().cpu()
    return save_obj(obj, uri)


def inversion_from_generator(gen: Generator, latent_avg: torch.Tensor, seed: int = 0) -> StyleTransformer:
    """A fresh (seeded) encoder around a pretrained generator: the start of encoder training."""
    torch.manual_seed(seed)
    model = StyleTransformer(gen.cfg)
    model.decoder.load_state_dict(gen.state_dict())
    avg = latent_avg if latent_avg.ndim == 2 else latent_avg.unsqueeze(0)
    la = avg[:1].expand(gen.cfg.n_queries, -1).clone()
    la[: min(avg.shape[0], la.shape[0])] = avg[: la.shape[0]]
    model.latent_avg.copy_(la)
    return model
