"""Ray Train worker loops of the two editing fit jobs.

    jobs.fit_classifier  -> classifier_loop   (LatentClassifier, BCE-with-logits, Adam)
    jobs.fit_editor      -> editor_loop       (one EditTransformer per attribute, classifier frozen)

Data reach the workers as Ray datasets (`datasets={"train": ..., "val": ...}`, built by
pipeline.fit_data / pipeline.labels from the committed latents snapshot): `train` is split
across the workers (data parallel, DDP when the world size is above 1), `val` is given whole to
every worker and only rank 0 evaluates on it, streaming: the held-out W+ codes are never held
together, only per-row logits and labels (classifier) or a bounded set of figure pairs
(editor). Rank 0 writes the checkpoints (official layouts) straight to object storage, under
the run-scoped keys the job passes in, and returns its figures as the loop's return value
(`Result.return_value`), which the job turns into its table rows / summary.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.sections import CodeTrainSection, TrainSection
from pipeline.train_sections import (
    ClassifierSection,
    EditorSection,
    EvalSection,
    FitClassifierSection,
    FitEditorSection,
    LossSection,
)

log = logging.getLogger("stbatch.fit")

EVAL_BATCH = 1024


# ---------------------------------------------------------------------------- evaluation maths

def auc_score(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank (Mann-Whitney) formula, tied scores sharing their average rank; NaN
    when one class is absent."""
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).ravel() > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, group, size = np.unique(s, return_inverse=True, return_counts=True)
    last = np.cumsum(size)                      # 1-based rank of each group's last member
    ranks = (last - (size - 1) / 2.0)[group.ravel()]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classifier_metrics(logits: np.ndarray, labels: np.ndarray, names: list[str]) -> list[dict]:
    """Per attribute: n_val, accuracy (logit > 0), auc, positive_rate, predicted_positive_rate;
    rows with a missing (NaN) label for that attribute are left out."""
    out = []
    for k, name in enumerate(names):
        m = ~np.isnan(labels[:, k])
        y, s = labels[m, k] > 0.5, logits[m, k]
        n = int(m.sum())
        out.append({"attribute": name, "attribute_index": k, "n_val": n,
                    "accuracy": float(((s > 0) == y).mean()) if n else math.nan,
                    "auc": auc_score(s, y) if n else math.nan,
                    "positive_rate": float(y.mean()) if n else math.nan,
                    "predicted_positive_rate": float((s > 0).mean()) if n else math.nan})
    return out


def masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits over the labels present (NaN = missing, left out)."""
    mask = ~torch.isnan(labels)
    loss = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(labels), reduction="none")
    return (loss * mask).sum() / mask.sum().clamp_min(1)


# ---------------------------------------------------------------------------- worker helpers

def _setup(t: TrainSection):
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(t.seed + rank)
    if t.torch_threads:
        torch.set_num_threads(t.torch_threads)
    return rank, world, ray.train.torch.get_device()


def _wrap(model: torch.nn.Module, world: int, device):
    import ray.train.torch

    model.to(device)
    return ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model


def _epoch(shard, t: CodeTrainSection, epoch: int, device):
    return shard.iter_torch_batches(batch_size=t.batch_size, dtypes=torch.float32, device=str(device),
                                    local_shuffle_buffer_size=t.shuffle_buffer or None,
                                    local_shuffle_seed=t.seed * 100_003 + epoch)


def first_keys(ds, limit: int) -> dict:
    """The `limit` rows of smallest `key` of a dataset shard (`key`, `w_plus`), streaming: at
    most `limit` + one batch of codes are held, and the choice does not depend on the order in
    which blocks arrive."""
    keys = np.zeros(0, dtype=object)
    codes = None
    for b in ds.iter_batches(batch_format="numpy", batch_size=EVAL_BATCH):
        if not len(b["key"]):
            continue
        keys = np.concatenate([keys, np.asarray(b["key"], dtype=object)])
        w = np.asarray(b["w_plus"], np.float32)
        codes = w if codes is None else np.concatenate([codes, w])
        order = np.argsort(keys.astype(str), kind="mergesort")[:limit]
        keys, codes = keys[order], codes[order]
    return {"key": keys, "w_plus": codes if codes is not None else np.zeros((0, 0, 0), np.float32)}


# ---------------------------------------------------------------------------- classifier loop

def _evaluate(model, shard, device, k: int, keep_rows: bool) -> tuple[float, np.ndarray, np.ndarray]:
    """Masked BCE over the held-out shard, streaming batch by batch; with `keep_rows` also the
    logits and labels of every held-out row (K floats each, for the metrics)."""
    model.eval()
    loss_sum, n_labels = 0.0, 0.0
    logits, labels = [], []
    with torch.no_grad():
        for b in shard.iter_torch_batches(batch_size=EVAL_BATCH, dtypes=torch.float32, device=str(device)):
            lg = model(b["w_plus"])[0]
            y = b["labels"]
            mask = ~torch.isnan(y)
            loss = F.binary_cross_entropy_with_logits(lg, torch.nan_to_num(y), reduction="none")
            loss_sum += float((loss * mask).sum())
            n_labels += float(mask.sum())
            if keep_rows:
                logits.append(lg.float().cpu().numpy())
                labels.append(y.float().cpu().numpy())
    model.train()
    val_loss = loss_sum / n_labels if n_labels else math.nan
    if not keep_rows:
        return val_loss, np.zeros((0, k), np.float32), np.zeros((0, k), np.float32)

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros((0, k), np.float32)

    return val_loss, cat(logits), cat(labels)


def classifier_loop(config: dict) -> dict | None:
    """Train a LatentClassifier on (w_plus, labels) batches. Config: `attributes`, `n_latent`,
    `style_dim`, `classifier` (a ClassifierSection: its shape), `train` (a FitClassifierSection),
    `classifier_uri` (where rank 0 saves it), `run_id`. Rank 0 returns the per-epoch history,
    the held-out metrics and the saved file's sha256."""
    import ray.train

    from stmodel.checkpoint import save_obj
    from stmodel.classifier import LatentClassifier, classifier_state

    t: FitClassifierSection = config["train"]
    rank, world, device = _setup(t)
    names = list(config["attributes"])
    c: ClassifierSection = config["classifier"]
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = LatentClassifier(config["n_latent"], config["style_dim"], len(names), hidden=tuple(c.hidden),
                             emb_dim=c.emb_dim, attributes=names)
    net = _wrap(model, world, device)
    opt = torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    train = ray.train.get_dataset_shard("train")
    val = ray.train.get_dataset_shard("val") if rank == 0 else None
    history, t0 = [], time.time()
    epochs = t.epochs
    logits: np.ndarray | None = None
    labels: np.ndarray | None = None
    for epoch in range(epochs):
        model.train()
        tot, nb = 0.0, 0
        for batch in _epoch(train, t, epoch, device):
            loss = masked_bce(net(batch["w_plus"])[0], batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot, nb = tot + float(loss.detach()), nb + 1
        if rank == 0:
            last = epoch + 1 == epochs
            val_loss, logits, labels = _evaluate(model, val, device, len(names), keep_rows=last)
            history.append({"epoch": epoch + 1, "train_loss": round(tot / max(nb, 1), 6),
                            "val_loss": round(val_loss, 6), "seconds": round(time.time() - t0, 2)})
            if (epoch + 1) % t.log_every == 0 or last:
                log.info("classifier epoch %d/%d: train BCE %.4f, val BCE %.4f", epoch + 1, epochs,
                         history[-1]["train_loss"], val_loss)
    if rank != 0:
        return None
    if logits is None or labels is None:  # no epoch: the metrics of the initial weights
        _, logits, labels = _evaluate(model, val, device, len(names), keep_rows=True)
    model.eval()
    state = classifier_state(model.cpu())
    state["opts"].update({"trained_by": "jobs.fit_classifier", "epochs": epochs, "run_id": config["run_id"]})
    sha = save_obj(state, config["classifier_uri"])
    return {"history": history, "eval": classifier_metrics(logits, labels, names), "sha256": sha}


# ---------------------------------------------------------------------------- editor loop

def _editor_figures(editor, classifier, ws, wr, k, weights) -> dict:
    """Mean loss parts of `editor` on fixed (source, reference) pairs, plus the distance of the
    source's own target embedding to the reference's (what an identity editor would score)."""
    from stmodel.editor import editor_loss

    editor.eval()
    with torch.no_grad():
        parts = {"l2": 0.0, "ref": 0.0, "src": 0.0, "total": 0.0}
        ident, n = 0.0, 0
        for i in range(0, len(ws), 256):
            s, r = ws[i:i + 256], wr[i:i + 256]
            _, p = editor_loss(s, r, editor(s, r), classifier, k, weights)
            m = len(s)
            for key in parts:
                parts[key] += float(p[key]) * m
            _, es = classifier(s)
            _, er = classifier(r)
            ident += float(F.mse_loss(es[:, k], er[:, k])) * m
            n += m
    editor.train()
    out = {key: round(v / max(n, 1), 6) for key, v in parts.items()}
    out["identity_ref"] = round(ident / max(n, 1), 6)
    out["pairs"] = n
    return out


def editor_loop(config: dict) -> dict | None:
    """Train one EditTransformer per attribute against the frozen classifier (official loss,
    each batch split in halves: sources, references). Config: `attributes`, `classifier_uri`
    (+ `classifier_sha256`), `editor` (an EditorSection), `loss` (a LossSection), `train` (a
    FitEditorSection), `eval` (an EvalSection), `editor_uris` {attribute: URI}, `run_id`. Rank 0
    returns per-attribute figures before/after."""
    import ray.train

    from stmodel.checkpoint import save_obj
    from stmodel.classifier import load_classifier
    from stmodel.editor import EditTransformer, editor_loss, editor_state

    t: FitEditorSection = config["train"]
    rank, world, device = _setup(t)
    clf = load_classifier(config["classifier_uri"], sha256=config["classifier_sha256"])
    clf.to(device).eval().requires_grad_(False)
    lw: LossSection = config["loss"]
    weights = (lw.l2, lw.ref, lw.src)
    e: EditorSection = config["editor"]
    ev: EvalSection = config["eval"]
    train = ray.train.get_dataset_shard("train")
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None  # rank 0's held-out (source, reference) pairs
    if rank == 0:
        v = first_keys(ray.train.get_dataset_shard("val"), 2 * ev.max_pairs)
        w = torch.from_numpy(v["w_plus"]).float().to(device)
        h = len(w) // 2
        pairs = (w[:h], w[h:2 * h])
    results = {}
    for a_i, attr in enumerate(config["attributes"]):
        k = clf.attribute_index(attr)
        torch.manual_seed(t.seed + 7919 * a_i)
        editor = EditTransformer(clf.style_dim, e.n_heads, e.ff_dim, e.dropout, e.query_norm)
        net = _wrap(editor, world, device)
        opt = torch.optim.Adam(editor.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        before = _editor_figures(editor, clf, *pairs, k, weights) if pairs is not None and len(pairs[0]) else None
        editor.train()
        step, epoch, t0, history = 0, 0, time.time(), []
        total_steps = t.steps
        while step < total_steps:
            seen = 0
            for batch in _epoch(train, t, epoch, device):
                w = batch["w_plus"]
                h = w.shape[0] // 2
                if h == 0:
                    continue
                ws, wr = w[:h], w[h:2 * h]
                loss, parts = editor_loss(ws, wr, net(ws, wr), clf, k, weights)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step, seen = step + 1, seen + 1
                if rank == 0 and (step % t.log_every == 0 or step == total_steps):
                    history.append({"step": step, **{p: round(float(x), 6) for p, x in parts.items()},
                                    "seconds": round(time.time() - t0, 2)})
                    log.info("editor %s step %d/%d: %s", attr, step, total_steps,
                             " ".join(f"{p}={float(x):.4f}" for p, x in parts.items()))
                if step >= total_steps:
                    break
            epoch += 1
            if seen == 0:
                raise RuntimeError("editor training: the train shard yielded no batch of 2 or more codes")
        if pairs is None:  # not rank 0
            continue
        after = _editor_figures(editor, clf, *pairs, k, weights) if len(pairs[0]) else None
        state = editor_state(editor, clf, None, {
            "attribute": attr, "attribute_index": k, "trained_by": "jobs.fit_editor", "steps": step,
            "loss_weights": list(weights), "eval_before": before, "eval_after": after,
            "run_id": config["run_id"]})
        uri = config["editor_uris"][attr]
        sha = save_obj(state, uri)
        results[attr] = {"uri": uri, "sha256": sha, "steps": step, "before": before, "after": after,
                         "history": history, "seconds": round(time.time() - t0, 2)}
    return results if rank == 0 else None


__all__ = ["auc_score", "classifier_metrics", "masked_bce", "first_keys", "classifier_loop", "editor_loop"]
