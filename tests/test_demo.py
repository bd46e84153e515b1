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

import pytest

from jobs import demo
from jobs.cli import load_config
from pipeline import delta
from pipeline.report_data import job_runs, read_records

MARGIN_DB = 1.5


@pytest.mark.slow
def test_short_demo_end_to_end(ray_local, tmp_path):
    cfg = load_config(demo.SETTINGS, None, [
        f"output={tmp_path / 'demo'}", "n_train=128", "n_val=16", "train_encoder.steps=300",
        "train_encoder.log_every=50", "train_encoder.val_every=150", "train_encoder.checkpoint_every=150",
        "fit.classifier_epochs=10", "fit.editor_steps=40"])
    res = demo.run(cfg)
    ev = res["extra"]["eval"]
    print("demo eval:", ev)
    assert ev["trained"]["psnr"] >= ev["mean_latent"]["psnr"] + MARGIN_DB
    assert ev["trained"]["psnr"] > ev["untrained"]["psnr"]
    assert all(math.isfinite(ev[k]["w_mse"]) for k in ev)  # reported; see the module docstring
    root = str(tmp_path / "demo")
    # every job published a run: a Delta commit (the truth), or only its record for training;
    # and every run accounts for its inputs
    notes: list = []
    runs = job_runs(root, delta.list_tables(root), read_records(root, notes), notes)
    assert not [n for n in notes if "unreadable" in n], notes
    states = {r.job: r.state for r in runs}
    assert {"train_encoder", "align", "invert", "fit_classifier", "fit_editor", "edit", "evaluate",
            "maintain"} <= set(states), states
    assert states["train_encoder"] == "record only"
    assert all(st == "committed" for j, st in states.items() if j != "train_encoder"), states
    for r in runs:
        s = r.summary
        assert s["in"] == s["ok"] + s["failed"] + s["skipped"], r.job
    faces = delta.read_snapshot_arrow(root, "faces", columns=["status"])
    assert {"ok", "no_face", "decode_error"} <= set(faces["status"].to_pylist())
    edits = delta.read_snapshot_arrow(root, "edits", columns=["edit_id", "kind", "status"])
    assert edits is not None and edits.num_rows > 0
    assert len(set(edits["edit_id"].to_pylist())) == edits.num_rows  # one row per key
    kinds = {r["kind"] for r in edits.to_pylist() if r["status"] == "ok"}
    assert kinds == {"label", "reference", "direction"}, edits.to_pylist()
    # no metric from a random network: LPIPS / ID were not configured, so they are null
    lat = delta.read_snapshot_arrow(root, "latents", columns=["image_id", "face_index", "lpips", "metric_backbones"])
    keys = list(zip(lat["image_id"].to_pylist(), lat["face_index"].to_pylist()))
    assert len(keys) == len(set(keys))
    assert all(v is None for v in lat["lpips"].to_pylist())
    assert all("RANDOM-INIT" not in (v or "") for v in lat["metric_backbones"].to_pylist())
    report = res["extra"]["report"]
    html = open(report).read()
    assert os.path.exists(report) and "data:image/png;base64" in html
    assert "NOT COMMITTED" not in html and "MISMATCH" not in html
