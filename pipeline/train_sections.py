"""The settings sections that the training loops read (pipeline.fit_loops: the classifier and the
editors; pipeline.train_loop: the encoder; pipeline.fit_data.SampleCodes: sampled codes),
declared once here so that a loop can name its section without importing jobs; importing this
needs neither torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import Section, setting
from pipeline.sections import CodeTrainSection, ModelSection, TrainSection


@dataclass
class ClassifierSection(Section):
    hidden: list[int] = setting([2048, 512], "hidden layer widths (the official LCNet_40 sizes)", ge=1)
    emb_dim: int = setting(32, "per-attribute embedding size", ge=1)


@dataclass
class FitClassifierSection(CodeTrainSection):
    epochs: int = setting(20, "passes over the training codes (0: the initial weights are evaluated)", ge=0)
    batch_size: int = setting(256, "codes per step and worker", ge=1)
    log_every: int = setting(1, "epochs between log lines", ge=1)


@dataclass
class SampleSection(Section):
    n: int = setting(0, "training codes drawn through the model's mapping net (when no latents; 0 or >= 2)", ge=0)
    n_val: int = setting(512, "held-out codes drawn the same way (other ids)", ge=0)
    truncation: float = setting(0.7, "psi towards the mapping net's mean", ge=0)
    mean_n: int = setting(4096, "samples averaged for that mean", ge=1)
    seed: int = setting(0, "seed of the draws")
    batch_size: int = setting(1024, "codes per sampling call", ge=1)
    num_gpus: float | Literal["auto"] = setting("auto", "GPUs of the sampling actor: auto = 1 when the cluster "
                                                        "has GPUs", ge=0)

    def problems(self) -> list[str]:
        return super().problems() + ([f"n: a training set needs 0 (no sampling) or at least 2 codes, got {self.n}"]
                                     if self.n == 1 else [])


@dataclass
class EditorSection(Section):
    n_heads: int = setting(4, "attention heads (must divide the codes' size)", ge=1)
    ff_dim: int = setting(1024, "feed-forward width", ge=1)
    dropout: float = setting(0.1, "dropout", ge=0, lt=1)
    query_norm: bool = setting(False, "layer-normalise the queries")


@dataclass
class LossSection(Section):
    l2: float = setting(1.0, "weight of MSE(w_s, w_e)", ge=0)
    ref: float = setting(1.0, "weight of the attribute embedding distance to the reference", ge=0)
    src: float = setting(1.0, "weight of the other attributes' embedding distance to the source", ge=0)


@dataclass
class EvalSection(Section):
    max_pairs: int = setting(256, "held-out (source, reference) pairs for the figures", ge=0)


@dataclass
class FitEditorSection(CodeTrainSection):
    steps: int = setting(10000, "training steps per attribute", ge=1)
    batch_size: int = setting(64, "codes per step and worker (halves: sources and references)", ge=2)
    weight_decay: float = setting(5e-4, "Adam weight decay", ge=0)
    log_every: int = setting(500, "steps between log lines", ge=1)


@dataclass
class EncoderModelSection(ModelSection):
    preset: str | None = setting(None, "the generator's shape (ffhq-1024, cars-512, tiny-*)")
    generator: str | None = setting(None, "plain StyleGAN2 file (g_ema) to train an encoder for (or: checkpoint, "
                                          "an inversion checkpoint to fine-tune)")
    generator_sha256: str | None = setting(None, "verify the generator file against this sha256 when set")

    def problems(self) -> list[str]:
        return super().problems() + (["generator: needs preset (the generator's shape)"]
                                     if self.generator and not self.checkpoint and not self.preset else [])


@dataclass
class TrainEncoderSection(TrainSection):
    steps: int = setting(1000, "training steps (a rerun resumes and stops at the same count)", ge=1)
    l2: float = setting(1.0, "loss weight of the pixel MSE", ge=0)
    lpips: float = setting(0.8, "loss weight of LPIPS (needs metric_weights.lpips_alexnet, or 0)", ge=0)
    id: float = setting(0.1, "loss weight of ID similarity (needs metric_weights.facenet, or 0)", ge=0)
    w_norm: float = setting(0.0, "loss weight of the W+ distance to the mean latent", ge=0)
    val_every: int = setting(100, "steps between validation grids", ge=1)
    checkpoint_every: int = setting(100, "steps between checkpoints", ge=1)
    val_images: int = setting(8, "validation images in the grids and the final evaluation", ge=1)
    resume: bool = setting(True, "resume from the newest complete checkpoint under output")
