"""Model and metric construction from a job's config, shared by the jobs' actors.

`model:` section of a config:
    checkpoint: URI of an official (or our own) Style Transformer checkpoint
    sha256:     optional expected hash of that file
    preset:     with no checkpoint, build a seeded random model of this preset (tests, demos)
    seed:       seed of that random model

`metrics:` weights come from configured URIs only; `allow_random_init` (tests only) builds
random backbones whose every output row is labelled as such.
"""
from __future__ import annotations

import abc
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import torch

from pipeline.redact import redact_text
from pipeline.sections import MetricWeights, ModelSection
from stmodel.checkpoint import inversion_config, load_bytes, load_inversion, read_bytes
from stmodel.config import ModelConfig, get_preset
from stmodel.device import resolve_device
from stmodel.inversion import StyleTransformer

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# the seed of random-init metric backbones (tests): every actor and every job scores alike
RANDOM_INIT_SEED = 0


def amp_dtype(amp: str | None, device: torch.device) -> torch.dtype | None:
    """`auto`: bf16 autocast on CUDA, full fp32 on the CPU."""
    if amp in (None, "none", False):
        return None
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    try:
        return AMP_DTYPES[amp]
    except KeyError:
        raise ValueError(f"amp must be auto, none, bf16 or fp16; got {amp!r}") from None


def random_model_info(preset: str, seed: int) -> dict:
    # A seeded random model has no file: its identity is its recipe.
    return {"name": f"{preset}-random-seed{seed}", "uri": None,
            "sha256": hashlib.sha256(f"random-init:{preset}:{seed}".encode()).hexdigest()}


def load_model(spec: ModelSection, generator: bool = True) -> tuple[StyleTransformer, dict]:
    """The inversion model of a `model:` config section, and a description for the tables:
    `{"name", "sha256", "uri"}` (a seeded random model is identified by preset and seed).
    `generator=False`: encoder and mapping net only (the same weights; `reconstruct` raises)."""
    if spec.checkpoint:
        model, info = load_inversion(spec.checkpoint, preset=spec.preset or None, sha256=spec.sha256 or None,
                                     generator=generator)
        return model, {"name": _name(spec), "sha256": info.sha256, "uri": spec.checkpoint}
    preset, seed = _random_spec(spec)
    torch.manual_seed(seed)
    return StyleTransformer(get_preset(preset), generator=generator).eval(), random_model_info(preset, seed)


def describe_model(spec: ModelSection) -> tuple[ModelConfig, dict]:
    """What the driver needs (shape, identity) without building the model or its weights."""
    if spec.checkpoint:
        data, digest = read_bytes(spec.checkpoint, spec.sha256 or None)
        cfg = inversion_config(load_bytes(data, spec.checkpoint), spec.preset or None)
        return cfg, {"name": _name(spec), "sha256": digest, "uri": spec.checkpoint}
    preset, seed = _random_spec(spec)
    return get_preset(preset), random_model_info(preset, seed)


def model_shapes(spec: ModelSection) -> dict:
    """Sizes and identity the driver needs, without building the model: input_size, pool_size,
    n_latent, style_dim, name, sha256."""
    mc, info = describe_model(spec)
    return {"input_size": mc.input_size, "pool_size": mc.pool_size, "n_latent": mc.n_latent,
            "style_dim": mc.style_dim, "name": info["name"], "sha256": info["sha256"]}


def _name(spec: ModelSection) -> str:
    """The model's name in rows and records: `name`, else the checkpoint's file name (never its
    query string, which a presigned URL signs with)."""
    name = getattr(spec, "name", None)  # NamedModelSection: the name written to the tables
    if name:
        return redact_text(name)
    uri = str(spec.checkpoint)
    path = urlsplit(uri).path if "://" in uri else uri
    return os.path.basename(path.rstrip("/"))


def _random_spec(spec: ModelSection) -> tuple[str, int]:
    if not spec.preset:
        raise ValueError("model: set model.checkpoint=URI (or model.preset=NAME with model.seed for a random model)")
    return spec.preset, spec.seed


def build_metrics(spec: MetricWeights, device: torch.device):
    """(LPIPSMetric | None, IDSimilarity | None) from a `metrics:` config section.

    A metric without weights is an error, unless `allow_random_init` (tests only: seeded random
    backbones, labelled in every row) or `skip_missing` (that metric is not computed, and its
    columns stay null with a label saying so)."""
    from stmodel.metrics import IDSimilarity, LPIPSMetric

    rnd = spec.allow_random_init
    skip = spec.skip_missing and not rnd
    # Random-init backbones (tests) are seeded, so every actor and every job scores alike.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        lp = ident = None
        if spec.lpips_alexnet or not skip:
            lp = LPIPSMetric(spec.lpips_alexnet or None, allow_random_init=rnd, device=device,
                             sha256=spec.lpips_alexnet_sha256 or None)
        if spec.facenet or not skip:
            ident = IDSimilarity(spec.facenet or None, allow_random_init=rnd, device=device,
                                 sha256=spec.facenet_sha256 or None)
    return lp, ident


def metric_label(lp, ident) -> str:
    return "; ".join([lp.label if lp else "lpips: not computed (no weights configured)",
                      ident.label if ident else "id: not computed (no weights configured)"])


class ModelActor(abc.ABC):
    """Base of the stages' actor classes: thread count, device, autocast dtype and the
    inversion model, set up once per actor (`generator=False` when nothing reconstructs: the
    synthesis network is then never built; `model=None` for a stage that runs other models
    only, such as the latent classifier or the identity backbone). A subclass maps a batch in `map_batch`, and builds
    whatever else it loads through `on_model_thread`.

    Every torch call of an actor, set-up included, runs on one thread of its own. Ray Data
    calls `__call__` on another thread than `__init__`, and OpenMP keeps one thread team per
    calling thread: a model set up on one thread and run on another holds two teams, more
    OpenMP threads than cores on a small machine, and libgomp then stops spinning between
    parallel regions, which slows every op (`bench.actor_threads` measures it)."""

    def __init__(self, model: ModelSection | None, device: str = "auto", amp: str = "auto", torch_threads: int = 0,
                 generator: bool = True):
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.on_model_thread(self._load, model, device, amp, torch_threads, generator)

    model: StyleTransformer   # (a stage built with model=None never touches these two)
    info: dict

    def _load(self, model: ModelSection | None, device: str, amp: str, torch_threads: int, generator: bool) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = resolve_device(device)
        self.amp = amp_dtype(amp, self.device)
        if model is None:
            return
        self.model, self.info = load_model(model, generator=generator)
        self.model.to(self.device).requires_grad_(False)
        if self.amp is not None:
            self.model.cast_encoder_weights(self.amp)

    def on_model_thread(self, fn, *args, **kwargs):
        """Run `fn(*args, **kwargs)` on the actor's model thread; its exception is raised here."""
        return self._model_thread.submit(fn, *args, **kwargs).result()

    def __call__(self, batch: dict):
        return self.on_model_thread(self.map_batch, batch)

    @abc.abstractmethod
    def map_batch(self, batch: dict):
        """A batch of the stage's input rows -> its output rows (runs on the model thread)."""

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)
