"""A shortened demo, run as `make demo` runs it (`python -m jobs.demo`): every job for real on a
local folder; the trained encoder must beat the mean-latent baseline; the output is the demo's
own progress, says where Ray's logs went, and the report shows the photos before | after.

Margin: with 300 steps on 128 images (batch 8, lr 1e-3, L2 only) the trained tiny encoder
reconstructed the validation images about 3 dB better than the mean latent in our runs
(about 15 dB against 12.2 dB); the test asks for 1.5 dB.

The W+ error to the true codes is reported, not asserted: trained on pixels only, the encoder
finds codes that render the image but are not the generating ones in layers that barely change
it (in our runs its W+ MSE stayed near the untrained encoder's, above the mean latent's).
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import uuid

import pytest

from pipeline import delta
from pipeline.report_data import job_runs, read_records
from tests.conftest import kill_tagged

MARGIN_DB = 1.5
MAX_LINES = 80  # issue 20: `make demo` printed 455 lines, 22 of them its own


def test_demo_builds_every_jobs_settings_before_it_runs(tmp_path):
    """The demo runs each job with that job's typed settings, all built (and checked against the
    jobs' ranges) before the first job runs; the later jobs get the encoder once it is trained."""
    from jobs import demo
    from pipeline.config import SettingsError, parse

    root = str(tmp_path / "demo")
    cfg = parse(demo.SETTINGS, {"output": root, "train_encoder": {"steps": 10}, "align_size": 64})
    plan = demo.plan(cfg, root)
    assert plan["train_encoder"].train_encoder.steps == 10 and plan["align"].align.size == 64
    assert plan["invert_faces"].paste_back.enabled and not plan["invert_synthetic"].paste_back.enabled
    assert plan["fit_editor"].fit_editor.steps == cfg.fit.editor_steps
    assert all(s.progress is False for s in plan.values()) and not os.path.exists(root)
    trained = demo.with_checkpoint(plan["evaluate"], "/ckpt.pt")
    assert trained.model.checkpoint == "/ckpt.pt" and plan["evaluate"].model.checkpoint == demo.TRAINED
    assert demo.with_checkpoint(plan["train_encoder"], "/ckpt.pt") is plan["train_encoder"]
    assert demo.check(cfg) == []
    bad = parse(demo.SETTINGS, {"output": root, "train_encoder": {"batch_size": 0, "lr": 0}})
    assert demo.check(bad) == ["the demo's train_encoder run: train_encoder.batch_size: must be >= 1, got 0",
                               "the demo's train_encoder run: train_encoder.lr: must be > 0, got 0.0"]
    with pytest.raises(SettingsError, match="n_val: must be >= 1"):
        parse(demo.SETTINGS, {"n_val": 0})


@pytest.mark.slow
def test_short_demo_end_to_end(tmp_path):
    root = str(tmp_path / "demo")
    sets = [f"output={root}", "n_train=128", "n_val=16", "train_encoder.steps=300", "train_encoder.log_every=50",
            "train_encoder.val_every=150", "train_encoder.checkpoint_every=150", "fit.classifier_epochs=10",
            "fit.editor_steps=40", "ray.num_cpus=2"]
    tag = f"demo-{uuid.uuid4().hex}"
    try:
        p = subprocess.run([sys.executable, "-m", "jobs.demo", *(f"--set={s}" for s in sets)], capture_output=True,
                           text=True, timeout=1500, env={**os.environ, "STBATCH_TEST_TREE": tag})
    finally:
        kill_tagged(tag)  # the demo's own local Ray, should its shutdown have left any of it
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-5000:]
    lines = out.splitlines()
    # a long stage logs progress every log_every_s: how many depends on the machine's speed, not
    # on how quiet the console is
    counted = [line for line in lines if " progress: " not in line]
    print(f"demo output: {len(lines)} lines, {len(lines) - len(counted)} of them progress lines")
    assert len(counted) <= MAX_LINES, out
    assert sum(line.startswith("[demo] ") for line in lines) >= 12
    assert "Reporting training result" not in out and "streaming_executor" not in out
    logs = re.search(r"^Ray's logs: (\S+)", out, re.M)
    assert logs and os.path.exists(logs.group(1)), out[:2000]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    # issue 21: the planted near-duplicates are searched for and the count is printed
    nd = res["near_duplicates"]
    print("demo near-duplicates:", nd)
    assert nd["planted"] == 12 and f"planted pairs found: {nd['found']}/12" in out
    # with the trained encoder's codes beside them, the defaults find the copies and group no
    # distinct faces: recall and precision >= 0.95 (12 of 12, no other pair; README, Analytics)
    assert nd["found"] / 12 >= 0.95, nd
    assert nd["found"] / (nd["found"] + nd["other_pairs"]) >= 0.95, nd
    ev = res["eval"]
    print("demo eval:", ev)
    assert ev["trained"]["psnr"] >= ev["mean_latent"]["psnr"] + MARGIN_DB
    assert ev["trained"]["psnr"] > ev["untrained"]["psnr"]
    assert all(math.isfinite(ev[k]["w_mse"]) for k in ev)  # reported; see the module docstring
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
    faces = delta.read_snapshot_arrow(root, "faces", columns=["image_id", "status"])
    assert {"ok", "no_face", "decode_error"} <= set(faces["status"].to_pylist())
    photo_faces = {r["image_id"] for r in faces.to_pylist() if r["status"] == "ok"}
    edits = delta.read_snapshot_arrow(root, "edits", columns=["edit_id", "image_id", "kind", "status",
                                                               "composite_uri"])
    assert edits is not None and edits.num_rows > 0
    assert len(set(edits["edit_id"].to_pylist())) == edits.num_rows  # one row per key
    rows = edits.to_pylist()
    assert {r["kind"] for r in rows if r["status"] == "ok"} == {"label", "reference", "direction"}, rows
    assert all(r["status"] == "ok" for r in rows), rows
    # paste-back: every edit of a photo face is a whole photo, the synthetic ones have none
    assert all(bool(r["composite_uri"]) == (r["image_id"] in photo_faces) for r in rows), rows
    assert all(os.path.exists(r["composite_uri"]) for r in rows if r["composite_uri"])
    # no metric from a random network: LPIPS / ID were not configured, so they are null
    lat = delta.read_snapshot_arrow(root, "latents", columns=["image_id", "face_index", "lpips", "metric_backbones",
                                                               "composite_uri"])
    keys = list(zip(lat["image_id"].to_pylist(), lat["face_index"].to_pylist()))
    assert len(keys) == len(set(keys))
    assert all(v is None for v in lat["lpips"].to_pylist())
    assert all("RANDOM-INIT" not in (v or "") for v in lat["metric_backbones"].to_pylist())
    assert sum(1 for r in lat.to_pylist() if r["composite_uri"]) == len(photo_faces)
    html = open(res["report"]).read()
    assert "data:image/png;base64" in html and "NOT COMMITTED" not in html and "MISMATCH" not in html
    assert "Whole photos: before | after" in html.split('<section id="edits">')[1]
    assert "Whole photos: before | after" in html.split('<section id="latents">')[1].split("</section>")[0]
