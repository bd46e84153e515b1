"""The dataset report: one self-contained HTML file from whatever a dataset root holds, read
from the committed Delta snapshots and the Delta log (tables built here with the job runner)."""
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
from pipeline import delta, report_charts, report_data, report_page, storage
from pipeline.report_blocks import Banner, Grid
from pipeline.report_images import Thumb
from pipeline.report_render import render
from pipeline.report_sections import random_init_banner
from pipeline.runner import JobRun, TableSpec
from pipeline.schemas import FACES_SCHEMA, faces_table, latents_schema, make_table, metrics_schema
from pipeline.sections import ReportSection

# the settings a run record holds, for the runs these tests make by hand

REAL = "lpips-alex (torchvision AlexNet); facenet-vggface2"
RANDOM = "lpips-alex-RANDOM-INIT (not a real LPIPS); facenet-RANDOM-INIT (not a real ID metric)"


def _png(uri: str, seed: int, size: int = 300) -> str:
    rng = np.random.default_rng(seed)
    img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    storage.write_bytes(uri, buf.getvalue())
    return uri


FACES = TableSpec("faces", FACES_SCHEMA, ("image_id", "face_index"), ("image_id",))
LATENTS = TableSpec("latents", latents_schema(6, 8), ("image_id", "face_index"))
METRICS = TableSpec("metrics", metrics_schema(), ("image_id", "face_index"))
EDITS = TableSpec("edits", pa.schema([
    ("edit_id", pa.string()), ("image_id", pa.string()), ("kind", pa.string()), ("attribute", pa.string()),
    ("strength", pa.float32()), ("output_uri", pa.string()), ("logit_before", pa.float32()),
    ("logit_after", pa.float32()), ("id_similarity", pa.float32()), ("status", pa.string()),
    ("error", pa.string())]), ("edit_id",))


def _commit(root: str, job: str, spec: TableSpec, t: pa.Table, summary: dict) -> JobRun:
    """One run of `job` committing `t` to `spec` through the runner (no Ray: no key replacement)."""
    r = JobRun(root, job)
    r.commit({spec: r.write_small(spec, t)}, summary, replace=False)
    return r


def _dataset(root: str, labels: str = REAL, mismatch: bool = False) -> dict:
    """faces (3 ok, 1 failed) + latents (3 ok with one reconstruction missing, 1 failed) +
    metrics + a partial edits table + training output (and its record-only run) + a killed
    latents run (data file, no commit) + a run record without a commit."""
    ids = [f"{i:064x}" for i in range(1, 5)]
    aligned = [_png(storage.join(root, f"aligned/{ids[i][-8:]}.png"), i) for i in range(3)]
    recon = [_png(storage.join(root, f"reconstructions/{ids[i][-8:]}.png"), 10 + i) for i in range(2)]
    recon.append(storage.join(root, "reconstructions/gone.png"))  # referenced, never written

    rows = [{"image_id": ids[i], "source_uri": f"/photos/{i}.jpg", "status": "ok", "face_index": 0,
             "det_score": 0.9 + i / 100, "aligned_uri": aligned[i]} for i in range(3)]
    rows.append({"image_id": ids[3], "source_uri": "/photos/bad.jpg", "status": "no_face",
                 "error": "no face found above min_score=0.5"})
    _commit(root, "align", FACES, faces_table(rows, "x"), {"in": 4, "ok": 3, "failed": 1, "skipped": 0,
                                                           "seconds": 1.5})

    n = 4
    ok = np.array([True, True, True, False])
    w = np.random.default_rng(0).normal(size=(n, 6, 8)).astype(np.float32) * np.arange(1, 7)[None, :, None]
    cols = {"image_id": ids, "face_index": [0] * n, "aligned_uri": aligned + [None],
            "status": ["ok", "ok", "ok", "decode_error"], "error": [None, None, None, "not a recognised image"],
            "psnr": [20.0, 25.0, 30.0, None], "mse": [0.01, 0.005, 0.002, None],
            "lpips": [0.3, 0.2, 0.1, None], "id_similarity": [0.5, 0.6, 0.7, None],
            "metric_backbones": [labels] * 3 + [None], "reconstruction_uri": recon + [None], "model": ["tiny"] * n}
    _commit(root, "invert", LATENTS, make_table(cols, LATENTS.schema, "x", w_plus=w, ok=ok),
            {"in": 5 if mismatch else 4, "ok": 3, "failed": 1, "skipped": 0, "seconds": 2.0,
             "metrics": {"psnr": {"mean": 25.0, "p50": 25.0, "p95": 29.5, "n": 3}, "backbones": [labels]}})

    crashed = JobRun(root, "invert")  # data file written, never committed: must be ignored
    crashed.write_small(LATENTS, make_table(cols, LATENTS.schema, crashed.run_id, w_plus=w * 100, ok=ok))
    ghost = storage.new_run_id("invert")  # a record naming a commit the Delta log does not hold
    storage.write_bytes(storage.join(root, "_runs", f"{ghost}.json"), json.dumps(
        {"run_id": ghost, "job": "invert", "tables": {"latents": 7},
         "summary": {"in": 9, "ok": 9, "failed": 0, "skipped": 0}}).encode())

    mcols = {"image_id": ids[:3], "face_index": [0] * 3, "status": ["ok"] * 3, "psnr": [21.0, 24.0, 31.0],
             "mse": [0.01, 0.004, 0.001], "lpips": [0.25, 0.2, 0.15], "id_similarity": [0.55, 0.65, 0.75],
             "metric_backbones": [labels] * 3}
    _commit(root, "evaluate", METRICS, make_table(mcols, METRICS.schema, "x"),
            {"in": 3, "ok": 3, "failed": 0, "skipped": 0, "seconds": 0.7})

    # edits: only some of the columns, and one output image
    out0 = _png(storage.join(root, "edits/e0.png"), 20)
    _commit(root, "edit", EDITS, pa.table({
        "edit_id": ["e0", "e1", "e2"], "image_id": [ids[0], ids[0], ids[1]], "kind": ["label"] * 3,
        "attribute": ["Smiling", "Eyeglasses", "Smiling"], "strength": [1.0, 2.0, -1.0],
        "output_uri": [out0, None, storage.join(root, "edits/missing.png")],
        "logit_before": [-1.0, -2.0, 0.5], "logit_after": [2.0, -1.5, -0.5], "id_similarity": [0.8, None, 0.7],
        "status": ["ok", "edit_error", "ok"], "error": [None, "boom: generator failed", None]}, schema=EDITS.schema),
        {"in": 3, "ok": 2, "failed": 1, "skipped": 0, "seconds": 0.3})

    lines = [{"step": s, "loss": 1.0 / (1 + s), "l2": 0.5 / (1 + s), "lpips": 0.3, "seconds": s * 0.1}
             for s in range(0, 50, 5)]
    lines.append({"step": 50, "loss": 0.01})  # some keys missing
    storage.write_bytes(storage.join(root, "train/log.jsonl"),
                        ("\n".join(json.dumps(x) for x in lines) + "\nnot json\n").encode())
    _png(storage.join(root, "train/grids/step_000050.png"), 30, size=512)
    storage.write_bytes(storage.join(root, "train/eval.json"), json.dumps(
        {"trained": {"psnr": 24.1, "lpips": 0.2}, "mean_latent": {"psnr": 15.3, "lpips": 0.5}}).encode())
    JobRun(root, "train_encoder").commit({}, {"in": 10, "ok": 10, "failed": 0, "skipped": 0, "seconds": 5.0})
    return {"ids": ids, "crashed": crashed.run_id, "ghost": ghost}


def _run(inp: str, **sets) -> dict:
    return report.run(load_config(report.SETTINGS, None, [f"input={inp}"] + [f"{k}={v}" for k, v in sets.items()]))


def _html(uri: str) -> str:
    return storage.read_bytes(uri).decode("utf-8")


def test_full_dataset_report(tmp_path):
    root = str(tmp_path / "ds")
    info = _dataset(root)
    res = _run(root)
    assert res["run_id"] is None
    assert res["extra"]["report"] == storage.join(root, "report", "index.html")
    assert res["counts"] == {"in": 7, "ok": 6, "failed": 0, "skipped": 1}  # no analytics table
    # align, invert, evaluate, edit (Delta commits) and train_encoder (record only, no table)
    assert res["extra"]["runs"] == 5 and res["extra"]["missing_images"] == 2
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
    # the Delta log is the truth: a record without a commit is flagged, never counted
    assert info["ghost"] in html and "NOT COMMITTED: no Delta commit of latents" in html
    assert html.count('<tr class="uncommitted">') == 1 and "5 committed run(s)" in html
    assert "latents@1" in html and "train_encoder" in html
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
    assert res["counts"] == {"in": 7, "ok": 0, "failed": 0, "skipped": 7}
    assert "Not found" in html and "run jobs.align" in html

    # a corrupt record, an old-format manifest, a commit without a record, a lost data file,
    # a broken log line only
    root = tmp_path / "partial"
    (root / "_runs").mkdir(parents=True)
    (root / "_runs" / "bad.json").write_text("{not json")
    (root / "_runs" / "x.json").write_text(json.dumps({"job": "invert", "run_id": "x", "summary": {"in": 1},
                                                        "tables": {"latents": ["latents/run=x/part-00000.parquet"]}}))
    t = pa.table({"image_id": ["a", "b"], "status": ["ok", "ok"]})
    rec = delta.write_data_file(t, str(root), "metrics", "r1")
    delta.commit(str(root), "metrics", t.schema, None, [rec], "r1",
                 {"run_id": "r1", "job": "evaluate", "counts": json.dumps({"in": 2, "ok": 2, "failed": 0,
                                                                          "skipped": 0})})
    (root / "metrics" / rec.path).unlink()  # deleted by hand: the table cannot be read
    (root / "train").mkdir()
    (root / "train" / "log.jsonl").write_text("garbage\n")
    res = _run(str(root))
    html = _html(res["extra"]["report"])
    assert "unreadable run record bad.json" in html and "old manifest format" in html
    assert "r1 (evaluate): committed to metrics but has no run record" in html
    assert "this section could not be built" in html and res["counts"]["failed"] == 1
    assert res["extra"]["runs"] == 1  # r1 only: x is not in any Delta table
    assert "train/log.jsonl has no records" in html


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
    assert "no values" in report_charts.Histogram([None, float("nan")], "x").svg()
    h = report_charts.Histogram([1, 1, 1], "<b>t</b>").svg()
    assert "<b>" not in h and "&lt;b&gt;" in h and "<rect" in h
    assert "<polyline" in report_charts.LineChart({"a": ([0, 1, 2], [3, None, 1])}, "loss").svg()
    assert "no values" in report_charts.BarChart([None], ["0"], "w").svg()
    assert random_init_banner(["x", None]) is None and "RANDOM-INIT" in random_init_banner(["a-RANDOM-INIT"]).text
    assert 'class="ph"' in render("section.html.j2", anchor="a", title="t",
                                  items=[Banner("b"), Grid([Thumb(None, "cap")])])


def test_edits_table_with_few_columns(tmp_path):
    root = str(tmp_path / "ds")
    t = pa.table({"image_id": ["a", "b"], "attribute": ["Smiling", None], "logit_before": [[0.1, 0.2], [0.3, 0.4]]})
    rec = delta.write_data_file(t, root, "edits", "e1")
    delta.commit(root, "edits", t.schema, None, [rec], "e1", {"run_id": "e1", "job": "edit"})
    res = _run(root)
    html = _html(res["extra"]["report"])
    assert '<section id="edits">' in html and "no output_uri column" in html and "Smiling" in html
    assert res["counts"]["failed"] == 0


def test_wplus_norms_bounded_sample_and_ray(tmp_path, ray_local):
    """The norms never read every code into the driver: a bounded stream, or per-batch sums
    computed in Ray Data over every committed code (the same figures)."""
    root = str(tmp_path / "ds")
    _dataset(root)
    html = _html(_run(root, **{"report.max_wplus_rows": 2})["extra"]["report"])
    assert "mean ||w_l|| per W+ layer (n=2)" in html and "the first 2 ok codes of shape 6x8" in html
    html = _html(_run(root, **{"report.max_wplus_rows": "null"})["extra"]["report"])
    assert "mean ||w_l|| per W+ layer (n=3)" in html and "all 3 ok codes of shape 6x8" in html
    snap = report_data.open_snapshot(root, "latents", [])
    a, b = report_data.wplus_norms_sample(snap, 1000, batch_rows=1), report_data.wplus_norms_ray(snap, batch_rows=1)
    (n1, s1, q1), (n2, s2, q2) = a.by_shape[(6, 8)], b.by_shape[(6, 8)]
    assert n1 == n2 == 3 and np.allclose(s1, s2) and np.allclose(q1, q2)


def test_sections_read_only_scalar_columns(tmp_path, monkeypatch):
    """No section asks for a list column (w_plus) through the row readers."""
    root = str(tmp_path / "ds")
    _dataset(root)
    asked = []
    real = report_data.Snapshot.scalar

    def spy(self, columns):
        out = real(self, columns)
        asked.extend(out)
        return out

    monkeypatch.setattr(report_data.Snapshot, "scalar", spy)
    html, info = report_page.build_report(root, ReportSection())
    assert asked and "w_plus" not in asked and info["failed"] == 0


def test_report_settings_ranges_and_check():
    """The page's settings are typed and ranged once (pipeline.sections.ReportSection): the
    report job's settings and a direct build_report call share them."""
    import pytest

    from pipeline.config import SettingsError, parse

    cfg = parse(report.SETTINGS, {"input": "x", "report": {"max_images": 2, "max_wplus_rows": None}})
    assert isinstance(cfg.report, ReportSection) and cfg.report.max_images == 2 and cfg.report.max_wplus_rows is None
    assert cfg.report.thumb_px == ReportSection().thumb_px == 128
    with pytest.raises(SettingsError) as e:
        parse(report.SETTINGS, {"report": {"max_images": -1, "thumb_px": 0, "bins": 0, "max_wplus_rows": -5,
                                           "thumb_format": "gif"}})
    assert sorted(m.split(":")[0] for m in e.value.errors) == ["report.bins", "report.max_images",
                                                               "report.max_wplus_rows", "report.thumb_format",
                                                               "report.thumb_px"]
    assert report.check(parse(report.SETTINGS, {})) == [report.NO_INPUT]
    assert report.check(parse(report.SETTINGS, {"input": "/no/such/root"})) == []  # reported as empty


def test_pipeline_never_imports_jobs():
    """The layers run one way (jobs -> pipeline -> stmodel): the report used to start Ray through
    jobs.cli; the report job now hands it a `start_ray` instead."""
    import ast
    from pathlib import Path

    up = []
    for path in sorted((Path(__file__).parent.parent / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            up += [f"{path.name}: {n}" for n in names if n == "jobs" or n.startswith("jobs.")]
    assert not up, up
