"""Data of the editing-job tests: a committed Delta `latents` table of tiny-32 codes (8 x 64)
whose attributes follow a known rule, and models committed the way the fit jobs commit them
(a run-scoped file + a `models` row in the same run's commit)."""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from pipeline import storage
from pipeline.model_registry import MODELS, model_key, model_rows
from pipeline.runner import JobRun, TableSpec
from pipeline.schemas import latents_schema, make_table
from pipeline.sections import JobSettings

NL, D = 8, 64                      # tiny-32 W+
N_IMG = 800                        # ok codes in the latents table
ATTRS = ["Smiling", "Male", "Young"]
# one direction per attribute, the same in every layer (as W codes broadcast to W+ would carry it)
U = np.tile(np.random.default_rng(123).standard_normal((len(ATTRS), 1, D)), (1, NL, 1)).reshape(len(ATTRS), -1)
NO_LABELS = 10                     # the last ok codes have no row in the attributes table


def iid(i: int) -> str:
    return hashlib.sha256(f"image-{i}".encode()).hexdigest()


def rule(w: np.ndarray) -> np.ndarray:
    """The attributes: sign of the projection of the flattened code on fixed random vectors."""
    return (w.reshape(len(w), -1) @ U.T > 0).astype(np.int64)


def codes(n: int, seed: int) -> np.ndarray:
    """W-like codes: one vector per image broadcast to the layers, plus per-layer noise."""
    r = np.random.default_rng(seed)
    return (r.standard_normal((n, 1, D)) + 0.5 * r.standard_normal((n, NL, D))).astype(np.float32)


def write_latents(root: str, ckpt_sha: str, n: int = N_IMG) -> dict:
    """A committed latents table: `n` ok codes + 2 failed inversions (as jobs.invert writes)."""
    w = np.concatenate([codes(n, 0), np.zeros((2, NL, D), np.float32)])
    total = len(w)
    ok = np.arange(total) < n
    cols = {"image_id": [iid(i) for i in range(total)], "face_index": [0] * total,
            "source_uri": [f"s3://raw/photo_{i:05d}.jpg" for i in range(total)],
            "status": ["ok" if o else "decode_error" for o in ok],
            "error": [None if o else "not an image" for o in ok],
            "model": ["tiny32.pt"] * total, "checkpoint_sha256": [ckpt_sha] * total}
    spec = TableSpec("latents", latents_schema(NL, D), ("image_id", "face_index"))
    r = JobRun(root, "invert", JobSettings())
    r.commit({spec: r.write_small(spec, make_table(cols, spec.schema, r.run_id, w_plus=w, ok=ok))}, {"in": total})
    return {"w": w[:n], "ids": cols["image_id"][:n]}


def commit_model(root: str, kind: str, state: dict, filename: str, attribute: str | None = None) -> dict:
    """A model published like a fit job publishes it: file under the run's key, `models` row in
    the run's commit."""
    r = JobRun(root, f"fit_{kind}", JobSettings())
    uri = storage.join(root, model_key(kind, r.run_id, filename))
    from stmodel.checkpoint import save_obj

    sha = save_obj(state, uri)
    rows = model_rows([{"uri": uri, "kind": kind, "attribute": attribute, "sha256": sha}], r.run_id)
    r.commit({MODELS: r.write_small(MODELS, rows)}, {"in": 0, "ok": 0, "failed": 0, "skipped": 0})
    return {"uri": uri, "sha256": sha, "run_id": r.run_id}


def train_classifier(w: np.ndarray, labels: np.ndarray, steps: int = 200, seed: int = 0) -> dict:
    """A LatentClassifier fitted in this process (full batch, Adam): its checkpoint state."""
    from stmodel.classifier import LatentClassifier, classifier_state

    torch.manual_seed(seed)
    m = LatentClassifier(NL, D, len(ATTRS), hidden=(128, 64), emb_dim=16, attributes=ATTRS)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    x, y = torch.from_numpy(w), torch.from_numpy(labels).float()
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m(x)[0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return classifier_state(m.eval())


def editor_state_for(clf_state: dict, attribute: str, seed: int = 0) -> dict:
    """An (untrained, seeded) edit transformer checkpoint for `attribute`."""
    from stmodel.classifier import load_classifier
    from stmodel.editor import EditTransformer, editor_state

    torch.manual_seed(seed)
    ed = EditTransformer(D, 4, 64, 0.1, False)
    clf = load_classifier(clf_state)
    opts = {"attribute": attribute, "attribute_index": clf.attribute_index(attribute)}
    return editor_state(ed.eval(), clf, None, opts)
