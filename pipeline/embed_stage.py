"""Ray Data stages of the embed job: the identity vector (FaceNet InceptionResnetV1, 512-d,
L2-normalised) of each aligned crop of an ok code.

    ds = <committed latents snapshot> .map_batches(work_batch)  # ok faces + the backbone's label
    ds = run.mark_done(ds, EMBEDDINGS, key=EMBED_DONE_KEY)      # embedded by this backbone -> skipped
    ds = ds.map_batches(load_targets)                            # tasks: read + decode + resize
    ds = ds.map_batches(EmbedBatch, compute=ActorPoolStrategy(...))

The backbone comes from `metric_weights.facenet` (a configured file, never downloaded) or, in
tests only, `allow_random_init`: a seeded random network whose label (`RANDOM-INIT`) is in
every row it makes.
"""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.images import load_crops
from pipeline.models import RANDOM_INIT_SEED, ModelActor
from pipeline.schemas import (
    EMBEDDING_DIM,
    embeddings_schema,
    make_table,
    nested_list_array,
)
from pipeline.sections import ActorSection, MetricWeights
from pipeline.status import STATUS_LOST, STATUS_OK

log = logging.getLogger("stbatch.embed")

WORK_COLUMNS = ["image_id", "face_index", "aligned_uri", "status"]
EMBED_KEY = ("image_id", "face_index")
EMBED_DONE_KEY = ("image_id", "face_index", "backbone")
PASS = ("image_id", "face_index", "aligned_uri", "status", "error", "backbone")


def backbone_label(weights: MetricWeights) -> str:
    """The label IDSimilarity gives the backbone these settings build (known before any actor
    starts, so finished faces are skipped before a crop is read); ValueError without one."""
    if weights.facenet:
        return "facenet-vggface2"
    if weights.allow_random_init:
        return "facenet-RANDOM-INIT (not a real ID metric)"
    raise ValueError("set metric_weights.facenet=URI (the facenet-pytorch VGGFace2 state_dict); "
                     "allow_random_init is for tests")


def build_identity(weights: MetricWeights, device: torch.device):
    """The identity backbone of a `metric_weights` section; a random one is seeded, so every
    actor and every run embeds alike."""
    from stmodel.metrics import IDSimilarity

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return IDSimilarity(weights.facenet or None, allow_random_init=weights.allow_random_init,
                            device=device, sha256=weights.facenet_sha256 or None)


def work_batch(batch: pa.Table, backbone: str) -> pa.Table:
    """Committed latents rows -> work rows: the ok faces, with the backbone that will embed them."""
    t = batch.filter(pc.equal(batch.column("status"), STATUS_OK)).select(WORK_COLUMNS)
    n = t.num_rows
    return t.append_column("error", pa.nulls(n, pa.string())).append_column(
        "backbone", pa.array([backbone] * n, pa.string()))


def load_targets(batch: pa.Table, size: int, max_pixels: int) -> dict:
    """Work rows -> a numpy batch with the crop as `target` [N, 3, size, size] in [-1, 1] (rows
    that are not ok, i.e. skipped, are not read; a crop that cannot be read becomes its status)."""
    cols = {k: np.array(batch[k].to_pylist(), dtype=object) for k in PASS}
    cols["face_index"] = np.asarray(batch["face_index"].to_numpy(zero_copy_only=False), dtype=np.int32)
    return load_crops(cols, input_size=None, target_size=size, max_pixels=max_pixels)


def embedding_rows(batch: dict, emb: np.ndarray, ok: np.ndarray, run_id: str) -> pa.Table:
    """Work rows + their vectors [N, 512] -> `embeddings` rows (no vector where `ok` is False)."""
    schema = embeddings_schema()
    # an all-null text column reaches the actor as floats (NaN): text is text or null here
    cols: dict[str, list[str | None] | np.ndarray] = {
        k: [v if isinstance(v, str) else None for v in batch[k]] for k in PASS if k != "face_index"}
    cols["face_index"] = np.asarray(batch["face_index"], dtype=np.int32)
    t = make_table(cols, schema, run_id)
    col = nested_list_array(emb, pa.float32(), mask=None if ok.all() else ~ok, shape=(EMBEDDING_DIM,))
    return t.set_column(schema.get_field_index("embedding"), schema.field("embedding"), col)


def lost_rows(batch: pa.Table, run_id: str) -> pa.Table:
    """Work rows that never came back (a worker died with them): `lost`, tried again next run."""
    n = batch.num_rows
    cols = {k: np.array(batch[k].to_pylist(), dtype=object) for k in PASS}
    cols["status"] = np.array([STATUS_LOST] * n, dtype=object)
    cols["error"] = np.array(["row lost by the pipeline (worker crash)"] * n, dtype=object)
    return embedding_rows(cols, np.zeros((n, EMBEDDING_DIM), np.float32), np.zeros(n, bool), run_id)


class EmbedBatch(ModelActor):
    """Actor: the identity backbone loaded once; decoded crops -> `embeddings` rows."""

    def __init__(self, weights: MetricWeights, section: ActorSection, backbone: str, run_id: str, device: str = "cpu"):
        super().__init__(None, device, "none", section.threads)
        self.ident = self.on_model_thread(build_identity, weights, self.device)
        if self.ident.label != backbone:
            raise RuntimeError(f"the backbone built is {self.ident.label!r}, the job expected {backbone!r}")
        self.run_id = run_id

    @torch.no_grad()
    def map_batch(self, batch: dict) -> pa.Table:
        status = np.array(batch["status"], dtype=object)
        ok = status == STATUS_OK
        emb = np.zeros((len(status), EMBEDDING_DIM), np.float32)
        if ok.any():
            x = torch.from_numpy(np.ascontiguousarray(batch["target"][ok]))
            emb[ok] = self.ident.embed(x).float().cpu().numpy()
        return embedding_rows(batch, emb, ok, self.run_id)
