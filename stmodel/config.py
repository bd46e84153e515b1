"""One config dataclass for the inversion model family, with named presets.

The official presets reproduce the published shapes exactly; the `tiny-*` presets keep
the same module and key layout with narrow channels so tests and the demo run on a CPU.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    name: str = "ffhq-1024"
    # StyleGAN2 generator (rosinality layout)
    size: int = 1024
    style_dim: int = 512
    n_mlp: int = 8
    lr_mlp: float = 0.01
    channel_base: int = 32768  # channels(res) = min(channel_max, channel_base // res)
    channel_max: int = 512
    # Style Transformer encoder
    input_size: int = 256
    input_nc: int = 3
    stage_widths: tuple[int, ...] = (64, 128, 256, 512)
    stage_units: tuple[int, ...] = (3, 4, 14, 3)
    se_reduction: int = 16
    n_heads: int = 4
    ff_dim: int = 1024
    n_queries: int = 18  # hard-coded to 18 in the authors' code, also for cars-512
    pool_size: int = 256  # the official inference pools the output to 256

    @property
    def log_size(self) -> int:
        return int(math.log2(self.size))

    @property
    def n_latent(self) -> int:
        return 2 * self.log_size - 2

    @property
    def num_layers(self) -> int:
        return 2 * (self.log_size - 2) + 1

    def channels(self, res: int) -> int:
        return min(self.channel_max, self.channel_base // res)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stage_widths"] = list(self.stage_widths)
        d["stage_units"] = list(self.stage_units)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("stage_widths", "stage_units"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def validate(self) -> None:
        if self.size < 8 or self.size & (self.size - 1):
            raise ValueError(f"generator size must be a power of two >= 8, got {self.size}")
        if len(self.stage_widths) != 4 or len(self.stage_units) != 4:
            raise ValueError("the IR-SE backbone has exactly 4 stages")
        if self.stage_widths[-1] != self.style_dim:
            raise ValueError("the last backbone stage must be style_dim wide (c3 tokens feed the decoder)")
        if self.style_dim % self.n_heads:
            raise ValueError("style_dim must be divisible by n_heads")
        if self.n_queries < self.n_latent:
            raise ValueError(f"n_queries {self.n_queries} < n_latent {self.n_latent}")


PRESETS: dict[str, ModelConfig] = {
    "ffhq-1024": ModelConfig(),
    "cars-512": ModelConfig(name="cars-512", size=512),
    # Tiny presets: same layout, narrow channels, one unit per stage, 64 px encoder input.
    "tiny-32": ModelConfig(
        name="tiny-32", size=32, style_dim=64, n_mlp=4, channel_base=1024, channel_max=64,
        input_size=64, stage_widths=(16, 32, 48, 64), stage_units=(1, 1, 1, 1),
        se_reduction=4, n_heads=4, ff_dim=128, n_queries=8, pool_size=32,
    ),
    "tiny-64": ModelConfig(
        name="tiny-64", size=64, style_dim=64, n_mlp=4, channel_base=2048, channel_max=64,
        input_size=64, stage_widths=(16, 32, 48, 64), stage_units=(1, 1, 2, 1),
        se_reduction=4, n_heads=4, ff_dim=128, n_queries=10, pool_size=64,
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
    cfg.validate()
    return cfg


def preset_for_output_size(output_size: int) -> ModelConfig:
    """Official checkpoints carry only `opts['output_size']`: map it to the official preset."""
    for cfg in PRESETS.values():
        if cfg.size == output_size and not cfg.name.startswith("tiny"):
            return cfg
    raise ValueError(f"no official preset for output_size {output_size}")


__all__ = ["ModelConfig", "PRESETS", "get_preset", "preset_for_output_size"]
