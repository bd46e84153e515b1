"""The dataset report: one self-contained HTML file from whatever a dataset root holds."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
from PIL import Image

from jobs import report
from jobs.cli import load_config
from pipeline import report_html as H
from pipeline import storage
from pipeline.schemas import faces_table, latents_schema, make_table, metrics_schema

REAL = "lpips-alex (torchvision AlexNet); facenet-vggface2"
RANDOM = "lpips-alex-RANDOM-INIT (not a real LPIPS); facenet-RANDOM-INIT (not a real ID metric)"


def _png(uri: str, seed: int, size: int = 300) -> str:
    rng = np.random.default_rng(seed)
    img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    storage.write_bytes(uri, buf.getvalue())
    return uri


def _dataset(root: str, labels: str = REAL, mismatch: bool = False) -> dict:
    """faces (3 ok, 1 failed) + latents (3 ok with one reconstruction missing, 1 failed) +
    metrics + a partial edits table + training output + one uncommitted latents run."""
    ids = [f"{i:064x}" for i in range(1, 5)]
    aligned = [_png(storage.join(root, f"aligned/{ids[i][-8:]}.png"), i) for i in range(3)]
    recon = [_png(storage.join(root, f"reconstructions/{ids[i][-8:]}.png"), 10 + i) for i in range(2)]
    recon.append(storage.join(root, "reconstructions/gone.png"))  # referenced, never written

    r = storage.Run(root, "align", {})
    rows = [{"image_id": ids[i], "source_uri": f"/photos/{i}.jpg", "status": "ok", "face_index": 0,
             "det_score": 0.9 + i / 100, "aligned_uri": aligned[i]} for i in range(3)]
    rows.append({"image_id": ids[3], "source_uri": "/photos/bad.jpg", "status": "no_face",
                 "error": "no face found above min_score=0.5"})
    r.write_table("faces", faces_table(rows, r.run_id))
    r.commit({"in": 4, "ok": 3, "failed": 1, "skipped": 0, "seconds": 1.5})

    r = storage.Run(root, "invert", {})
    n = 4
    ok = np.array([True, True, True, False])
    w = np.random.default_rng(0).normal(size=(n, 6, 8)).astype(np.float32) * np.arange(1, 7)[None, :, None]
    cols = {"image_id": ids, "face_index": [0] * n, "aligned_uri": aligned + [None],
            "status": ["ok", "ok", "ok", "decode_error"], "error": [None, None, None, "not a recognised image"],
            "psnr": [20.0, 25.0, 30.0, None], "mse": [0.01, 0.005, 0.002, None],
            "lpips": [0.3, 0.2, 0.1, None], "id_similarity": [0.5, 0.6, 0.7, None],
            "metric_backbones": [labels] * 3 + [None], "reconstruction_uri": recon + [None], "model": ["tiny"] * n}
    r.write_table("latents", make_table(cols, latents_schema(6, 8), r.run_id, w_plus=w, ok=ok))
    r.commit({"in": 5 if mismatch else 4, "ok": 3, "failed": 1, "skipped": 0, "seconds": 2.0,
              "metrics": {"psnr": {"mean": 25.0, "p50": 25.0, "p95": 29.5, "n": 3}, "backbones": [labels]}})

    crashed = storage.Run(root, "invert", {})  # files written, never committed: must be ignored
    crashed.write_table("latents", make_table(cols, latents_schema(6, 8), crashed.run_id, w_plus=w, ok=ok))

    r = storage.Run(root, "evaluate", {})
    mcols = {"image_id": ids[:3], "face_index": [0] * 3, "status": ["ok"] * 3, "psnr": [21.0, 24.0, 31.0],
             "mse": [0.01, 0.004, 0.001], "lpips": [0.25, 0.2, 0.15], "id_similarity": [0.55, 0.65, 0.75],
             "metric_backbones": [labels] * 3}
    r.write_table("metrics", make_table(mcols, metrics_schema(), r.run_id))
    r.commit({"in": 3, "ok": 3, "failed": 0, "skipped": 0, "seconds": 0.7})

    # edits: written by another job; only some of its columns, and one output image
    r = storage.Run(root, "edit", {})
    out0 = _png(storage.join(root, "edits/e0.png"), 20)
    r.write_table("edits", pa.table({
        "edit_id": ["e0", "e1", "e2"], "image_id": [ids[0], ids[0], ids[1]], "kind": ["label"] * 3,
        "attribute": ["Smiling", "Eyeglasses", "Smiling"], "strength": [1.0, 2.0, -1.0],
        "output_uri": [out0, None, storage.join(root, "edits/missing.png")],
        "logit_before": [-1.0, -2.0, 0.5], "logit_after": [2.0, -1.5, -0.5], "id_similarity": [0.8, None, 0.7],
        "status": ["ok", "edit_error", "ok"], "error": [None, "boom: generator failed", None]}))
    r.commit({"in": 3, "ok": 2, "failed": 1, "skipped": 0, "seconds": 0.3})

    lines = [{"step": s, "loss": 1.0 / (1 + s), "l2": 0.5 / (1 + s), "lpips": 0.3, "seconds": s * 0.1}
             for s in range(0, 50, 5)]
    lines.append({"step": 50, "loss": 0.01})  # some keys missing
    storage.write_bytes(storage.join(root, "train/log.jsonl"),
                        ("\n".join(json.dumps(x) for x in lines) + "\nnot json\n").encode())
    _png(storage.join(root, "train/grids/step_000050.png"), 30, size=512)
    storage.write_bytes(storage.join(root, "train/eval.json"), json.dumps(
        {"trained": {"psnr": 24.1, "lpips": 0.2}, "mean_latent": {"psnr": 15.3, "lpips": 0.5}}).encode())
    return {"ids": ids, "crashed": crashed.run_id}


def _run(inp: str, **sets) -> dict:
    return report.run(load_config(report.DEFAULTS, None, [f"input={inp}"] + [f"{k}={v}" for k, v in sets.items()]))


def _html(uri: str) -> str:
    return storage.read_bytes(uri).decode("utf-8")


def test_full_dataset_report(tmp_path):
    root = str(tmp_path / "ds")
    info = _dataset(root)
    res = _run(root)
    assert res["run_id"] is None
    assert res["extra"]["report"] == storage.join(root, "report", "index.html")
    assert res["counts"] == {"in": 6, "ok": 6, "failed": 0, "skipped": 0}
    assert res["extra"]["runs"] == 4 and res["extra"]["missing_images"] == 2
    html = _html(res["extra"]["report"])
    for anchor in ("overview", "jobs", "faces", "latents", "metrics", "edits", "training"):
        assert f'<section id="{anchor}">' in html
    # self-contained: embedded images, inline SVG charts, no external references
    assert html.count("data:image/png;base64,") >= 8
    assert '<svg class="chart hist"' in html and '<svg class="chart bars"' in html
    assert '<svg class="chart line"' in html
    assert "<script" not in html and 'src="http' not in html and "<link" not in html
    # every chart is well-formed SVG
    import re
    import xml.etree.ElementTree as ET
    svgs = re.findall(r"<svg .*?</svg>", html, flags=re.S)
    assert len(svgs) >= 8
    for svg in svgs:
        ET.fromstring(svg)
    # faces: status counts and the failed input with its error text
    assert "no_face" in html and "no face found above min_score=0.5" in html
    # latents: input | reconstruction, a placeholder for the missing file, the labels, W+ plot
    assert "Input | reconstruction" in html and "mean ||w_l|| per W+ layer (n=3)" in html
    assert REAL in html and "RANDOM-INIT" not in html
    assert "could not be read" in html  # reconstructions/gone.png and edits/missing.png
    # accounting fine, uncommitted run ignored and mentioned
    assert "MISMATCH" not in html
    assert info["crashed"] in html and "uncommitted" in html
    # edits: grouped grid and attribute x kind summary (mean logit change of ok Smiling rows)
    assert "Input | edits" in html and "Eyeglasses" in html and "boom: generator failed" in html
    assert "By attribute and kind" in html and "mean logit change" in html
    # training: curves, grid, eval comparison
    assert "mean_latent" in html and "step_000050.png" in html and "unparsable" in html
    # thumbnails are downscaled (300 px sources -> <= 128 px)
    import base64
    first = html.split("data:image/png;base64,", 1)[1].split('"', 1)[0]
    assert max(Image.open(io.BytesIO(base64.b64decode(first))).size) <= 128


def test_random_init_warning_and_mismatch_flag(tmp_path):
    root = str(tmp_path / "ds")
    _dataset(root, labels=RANDOM, mismatch=True)
    out = str(tmp_path / "elsewhere")
    res = _run(root, output=out)
    assert res["extra"]["report"] == storage.join(out, "report", "index.html")
    html = _html(res["extra"]["report"])
    assert "RANDOM-INIT metric backbones" in html and "not real LPIPS or identity metrics" in html
    assert 'class="banner error"' in html
    assert "MISMATCH: in != ok + failed + skipped" in html and '<tr class="mismatch">' in html
    assert html.count('<tr class="mismatch">') == 1


def test_empty_and_partial_roots(tmp_path):
    res = _run(str(tmp_path / "nothing"))
    html = _html(res["extra"]["report"])
    assert "Nothing here yet" in html and res["extra"]["runs"] == 0
    assert res["counts"] == {"in": 6, "ok": 0, "failed": 0, "skipped": 6}
    assert "Not found" in html and "run jobs.align" in html

    # a corrupt manifest, a manifest listing a lost file, a broken log line only
    root = tmp_path / "partial"
    (root / "_runs").mkdir(parents=True)
    (root / "_runs" / "bad.json").write_text("{not json")
    (root / "_runs" / "x.json").write_text(json.dumps({"job": "invert", "run_id": "x", "summary": {"in": 1},
                                                        "tables": {"latents": ["latents/run=x/part-00000.parquet"]}}))
    (root / "train").mkdir()
    (root / "train" / "log.jsonl").write_text("garbage\n")
    res = _run(str(root))
    html = _html(res["extra"]["report"])
    assert "unreadable manifest bad.json" in html and "unreadable file latents/run=x" in html
    assert "incomplete counts" in html and "train/log.jsonl has no records" in html


def test_cli(tmp_path):
    root = str(tmp_path / "ds")
    _dataset(root)
    p = subprocess.run([sys.executable, "-m", "jobs.report", "--set", f"input={root}", "--set", "report.max_images=2",
                        "--set", "report.thumb_format=jpeg", "--quiet"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["job"] == "report" and summary["report"].endswith("report/index.html")
    assert "report written to" in p.stderr and "accounting mismatch" not in p.stderr
    html = _html(summary["report"])
    assert "data:image/jpeg;base64," in html and "first 2 of 3" in html


def test_report_on_s3(s3_bucket):
    root = f"{s3_bucket}/ds"
    _dataset(root, labels=RANDOM)
    res = _run(root)
    assert res["extra"]["report"] == f"{root}/report/index.html"
    html = _html(res["extra"]["report"])
    assert "data:image/png;base64," in html and "RANDOM-INIT" in html and '<section id="latents">' in html
    assert "step_000050.png" in html


def test_svg_helpers_are_safe_and_tolerant():
    assert "no values" in H.svg_histogram([None, float("nan")], "x")
    h = H.svg_histogram([1, 1, 1], "<b>t</b>")
    assert "<b>" not in h and "&lt;b&gt;" in h and "<rect" in h
    assert "<polyline" in H.svg_line_chart({"a": ([0, 1, 2], [3, None, 1])}, "loss")
    assert "no values" in H.svg_bar_chart([None], ["0"], "w")
    assert H.random_init_warning(["x", None]) == "" and "RANDOM-INIT" in H.random_init_warning(["a-RANDOM-INIT"])
    assert 'class="ph"' in H.img_cell(None, "cap")


def test_edits_table_with_few_columns(tmp_path):
    root = str(tmp_path / "ds")
    r = storage.Run(root, "edit", {})
    r.write_table("edits", pa.table({"image_id": ["a", "b"], "attribute": ["Smiling", None],
                                     "logit_before": [[0.1, 0.2], [0.3, 0.4]]}))
    r.commit({"in": 2, "ok": 2, "failed": 0, "skipped": 0})
    res = _run(root)
    html = _html(res["extra"]["report"])
    assert '<section id="edits">' in html and "no output_uri column" in html and "Smiling" in html
    assert res["counts"]["failed"] == 0
