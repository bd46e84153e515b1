"""A shortened demo: every job for real on a local folder; the trained encoder must beat the
mean-latent baseline.

Margin: with 300 steps on 128 images (batch 8, lr 1e-3, L2 only) the trained tiny encoder
reconstructed the validation images about 3 dB better than the mean latent in our runs
(about 15 dB against 12.2 dB); the test asks for 1.5 dB.

The W+ error to the true codes is reported, not asserted: trained on pixels only, the encoder
finds codes that render the image but are not the generating ones in layers that barely change
it (in our runs its W+ MSE stayed near the untrained encoder's, above the mean latent's).
"""
from __future__ import annotations

import math
import os

from jobs import demo
from jobs.cli import load_config
from pipeline import storage

MARGIN_DB = 1.5


def test_short_demo_end_to_end(ray_local, tmp_path):
    cfg = load_config(demo.DEFAULTS, None, [
        f"output={tmp_path / 'demo'}", "n_train=128", "n_val=16", "train.steps=300", "train.log_every=50",
        "train.val_every=150", "train.checkpoint_every=150", "fit.classifier_epochs=10", "fit.editor_steps=40"])
    res = demo.run(cfg)
    ev = res["extra"]["eval"]
    print("demo eval:", ev)
    assert ev["trained"]["psnr"] >= ev["mean_latent"]["psnr"] + MARGIN_DB
    assert ev["trained"]["psnr"] > ev["untrained"]["psnr"]
    assert all(math.isfinite(ev[k]["w_mse"]) for k in ev)  # reported; see the module docstring
    root = str(tmp_path / "demo")
    # every job published a run, and every run accounts for its inputs
    jobs = {m["job"]: m["summary"] for m in storage.committed_manifests(root)}
    assert {"train_encoder", "align", "invert", "fit_classifier", "fit_editor", "edit", "evaluate"} <= set(jobs)
    for m in storage.committed_manifests(root):
        s = m["summary"]
        assert s["in"] == s["ok"] + s["failed"] + s["skipped"], m["job"]
    faces = storage.read_committed(root, "faces").to_pylist()
    by_status = {r["status"] for r in faces}
    assert {"ok", "no_face", "decode_error"} <= by_status
    edits = storage.read_committed(root, "edits")
    assert edits is not None and edits.num_rows > 0
    kinds = {r["kind"] for r in edits.to_pylist() if r["status"] == "ok"}
    assert kinds == {"label", "reference", "direction"}, edits.to_pylist()
    # no metric from a random network: LPIPS / ID were not configured, so they are null
    lat = storage.read_committed(root, "latents").to_pylist()
    assert all(r["lpips"] is None for r in lat)
    assert all("RANDOM-INIT" not in (r["metric_backbones"] or "") for r in lat)
    report = res["extra"]["report"]
    assert os.path.exists(report) and "data:image/png;base64" in open(report).read()
