"""The settings of jobs.fit_editor (see its module doc), declared once; importing this needs neither torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import Section, setting
from pipeline.sections import CodeTrainSection, JobSettings, ModelSection


@dataclass
class SampleSection(Section):
    n: int = setting(0, "training codes drawn through the model's mapping net (when no latents)")
    n_val: int = setting(512, "held-out codes drawn the same way (other ids)")
    truncation: float = setting(0.7, "psi towards the mapping net's mean")
    mean_n: int = setting(4096, "samples averaged for that mean")
    seed: int = setting(0, "seed of the draws")
    batch_size: int = setting(1024, "codes per sampling call")
    num_gpus: float | Literal["auto"] = setting("auto", "GPUs of the sampling actor: auto = 1 when the cluster "
                                                        "has GPUs")


@dataclass
class EditorSection(Section):
    n_heads: int = setting(4, "attention heads")
    ff_dim: int = setting(1024, "feed-forward width")
    dropout: float = setting(0.1, "dropout")
    query_norm: bool = setting(False, "layer-normalise the queries")


@dataclass
class LossSection(Section):
    l2: float = setting(1.0, "weight of MSE(w_s, w_e)")
    ref: float = setting(1.0, "weight of the attribute embedding distance to the reference")
    src: float = setting(1.0, "weight of the other attributes' embedding distance to the source")


@dataclass
class EvalSection(Section):
    max_pairs: int = setting(256, "held-out (source, reference) pairs for the figures")


@dataclass
class FitEditorSection(CodeTrainSection):
    steps: int = setting(10000, "training steps per attribute")
    batch_size: int = setting(64, "codes per step and worker (halves: sources and references)")
    weight_decay: float = setting(5e-4, "Adam weight decay")
    log_every: int = setting(500, "steps between log lines")


@dataclass
class Settings(JobSettings):
    classifier: str | None = setting(None, "dataset root of jobs.fit_classifier (or a classifier file + its sha256)")
    classifier_run: str | None = setting(None, "that root's classifier of this run (default: the newest committed)")
    classifier_sha256: str | None = setting(None, "... or with this sha256 (required for a file)")
    output: str | None = setting(None, "model_files/editor/<run>/editor_<attribute>.pt, models/ table, _runs/")
    attributes: list[str] | str | None = setting(None, "[Smiling, ...]: one editor each (names known to the "
                                                       "classifier)")
    latents: str | None = setting(None, "dataset root with a committed latents table ...")
    val_fraction: float = setting(0.05, "... held-out share of its image ids (for the figures)")
    split_seed: int = setting(0, "seed of that split")
    model: ModelSection = setting(ModelSection, "... or the inversion model whose mapping net samples codes")
    sample: SampleSection = setting(SampleSection, "sampled codes (without latents)")
    editor: EditorSection = setting(EditorSection, "the edit transformer's shape")
    loss: LossSection = setting(LossSection, "loss weights")
    fit_editor: FitEditorSection = setting(FitEditorSection, "Ray Train settings")
    eval: EvalSection = setting(EvalSection, "the before / after figures")
