"""No URI secret (userinfo, a presigned query) reaches what the jobs write: run records, table
rows, log lines, the summary line, the report."""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.redact import install_log_redaction, redact_table, redact_text, redact_uri

SECRET = "TOPSECRET7f3a"
SIGNED = f"X-Amz-Signature={SECRET}&X-Amz-Credential=AKIA{SECRET}&X-Amz-Security-Token={SECRET}"


@pytest.mark.parametrize("raw,shown", [
    (f"https://host/p/d.npy?{SIGNED}&v=1",
     "https://host/p/d.npy?X-Amz-Signature=REDACTED&X-Amz-Credential=REDACTED&X-Amz-Security-Token=REDACTED&v=1"),
    (f"https://user:{SECRET}@host/p", "https://host/p"),
    (f"s3://bucket/k#access_token={SECRET}", "s3://bucket/k#access_token=REDACTED"),
    (f"ckpt.pt?{SIGNED}", "ckpt.pt?X-Amz-Signature=REDACTED&X-Amz-Credential=REDACTED&X-Amz-Security-Token=REDACTED"),
    (f"cannot read 'https://u:{SECRET}@h/x.npy?sig={SECRET}': gone",
     "cannot read 'https://h/x.npy?sig=REDACTED': gone"),
    ("nothing to see: a=b & c, mail me@example.org", "nothing to see: a=b & c, mail me@example.org"),
])
def test_redact_text(raw, shown):
    assert redact_text(raw) == shown
    assert redact_text(shown) == shown  # idempotent


def test_redact_table_only_touches_strings_that_hold_secrets():
    t = pa.table({"uri": ["/plain/a.png", f"https://u:{SECRET}@h/k", None],
                  "error": [None, f"failed on gs://b/o?X-Goog-Signature={SECRET}", "ok"],
                  "n": [1, 2, 3]})
    out = redact_table(t)
    assert out.schema == t.schema and SECRET not in str(out.to_pydict())
    assert out["uri"].to_pylist() == ["/plain/a.png", "https://h/k", None] and out["n"] == t["n"]
    assert redact_table(t.select(["n"])) == t.select(["n"])


def test_log_records_are_redacted(caplog):
    before = logging.getLogRecordFactory()
    try:
        install_log_redaction()
        install_log_redaction()  # once only
        log = logging.getLogger("stbatch.test")
        with caplog.at_level(logging.INFO):
            log.info("reading %s", f"https://u:{SECRET}@h/x?{SIGNED}")
            try:
                raise OSError(f"cannot open s3://b/k?X-Amz-Signature={SECRET}")
            except OSError:
                log.exception("failed")
        assert "https://h/x?X-Amz-Signature=REDACTED" in caplog.text and "OSError" in caplog.text
        assert SECRET not in caplog.text
    finally:
        logging.setLogRecordFactory(before)


def test_report_text_is_redacted():
    from pipeline.report_render import environment

    page = environment().from_string("<p>{{ x }}</p>").render(x=f"<b>https://u:{SECRET}@h/x?sig={SECRET}</b>")
    assert page == "<p>&lt;b&gt;https://h/x?sig=REDACTED&lt;/b&gt;</p>"


def test_model_name_drops_the_query_string():
    from pipeline.models import _name
    from pipeline.sections import NamedModelSection

    assert _name(NamedModelSection(checkpoint=f"https://u:{SECRET}@h/m/ckpt.pt?{SIGNED}")) == "ckpt.pt"
    assert SECRET not in _name(NamedModelSection(name=f"mine?token={SECRET}", checkpoint="/x.pt"))
    assert redact_uri(f"https://h/m/ckpt.pt?{SIGNED}").startswith("https://h/m/ckpt.pt?")


def _scan(root: str) -> list[str]:
    """Every place under `root` whose content holds SECRET: table rows (every Parquet file, read
    back), run records, Delta logs, the report."""
    hits = []
    for path in glob.glob(os.path.join(root, "**", "*"), recursive=True):
        if os.path.isdir(path) or path.endswith((".png", ".jpg", ".npy", ".pt")):
            continue
        text = str(pq.read_table(path).to_pylist()) if path.endswith(".parquet") else open(path, "rb").read().decode(
            "utf-8", "replace")
        if SECRET in text:
            hits.append(path)
    return hits


def test_no_secret_in_records_rows_logs_or_report(ray_local, tmp_path, tiny_checkpoint):
    """A whole edit job (its own process: its Ray workers' logs reach its stderr) given files
    whose names carry a presigned query (as a downloaded presigned URL keeps it), an editor that
    fails its checksum (its URI quoted in a log line and in rows), a refused https direction with
    userinfo and a signature, and an allowed prefix with a token; then the report."""
    import numpy as np

    from stmodel.checkpoint import save_obj
    from tests.editing_data import D, editor_state_for, rule, train_classifier, write_latents

    ckpt, digest = tiny_checkpoint
    root, out = str(tmp_path / "ds"), str(tmp_path / "out")
    lat = write_latents(root, digest, n=64)
    ids, clf_state = lat["ids"], train_classifier(lat["w"], rule(lat["w"]), steps=20)
    files = tmp_path / "files"
    files.mkdir()
    model = files / f"tiny32.pt?{SIGNED}"
    shutil.copy(ckpt, model)
    clf_sha = save_obj(clf_state, str(files / f"classifier.pt?{SIGNED}"))
    save_obj(editor_state_for(clf_state, "Smiling"), str(files / f"editor.pt?{SIGNED}"))
    os.makedirs(os.path.join(out, "dirs"))
    inside = os.path.join(out, "dirs", f"d?token={SECRET}.npy")  # allowed: under the output root
    np.save(open(inside, "wb"), np.ones(D, np.float32))
    refused = f"https://user:{SECRET}@example.invalid/d.npy?{SIGNED}"
    req = tmp_path / "requests.csv"
    req.write_text("image_id,kind,attribute,strength,reference_image_id,direction_uri\n"
                   f"{ids[0]},label,Smiling,1.0,,\n"
                   f"{ids[1]},direction,,1.0,,{refused}\n"
                   f"{ids[2]},reference,Smiling,,{ids[3]},\n"
                   f"{ids[4]},label,Smiling,NaN,,\n"
                   f"{ids[5]},direction,,2.0,,{inside}\n")
    sets = {"latents": root, "output": out, "requests": str(req), "metrics": "false",
            "model.checkpoint": f"file://{model}", "classifier": f"file://{files}/classifier.pt?{SIGNED}",
            "classifier_sha256": clf_sha, "editors.Smiling": f"file://{files}/editor.pt?{SIGNED}",
            "editors_sha256.Smiling": "f" * 64,
            "direction_prefixes": f"[https://deploy:{SECRET}@example.invalid/allowed]",
            "ray.num_cpus": 2, "edit.batch_size": 8}
    argv = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    run = subprocess.run([sys.executable, "-m", "jobs.edit", "--quiet", *argv], capture_output=True, text=True,
                         timeout=900, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert (summary["in"], summary["ok"], summary["failed"], summary["skipped"]) == (5, 2, 3, 0), summary
    assert "editor Smiling unusable" in run.stderr  # the log line that quotes the editor's URI
    report = subprocess.run([sys.executable, "-m", "jobs.report", "--quiet", "--set", f"input={out}"],
                            capture_output=True, text=True, timeout=600,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert report.returncode == 0, report.stderr[-3000:]
    assert SECRET not in run.stdout + run.stderr + report.stdout + report.stderr
    assert _scan(out) == []
    # the secrets did reach the job: redacted, not lost
    from pipeline import delta

    rows = {r["image_id"]: r for r in delta.read_snapshot_arrow(out, "edits").to_pylist()}
    assert {r["model"] for r in rows.values()} == {"tiny32.pt"}
    assert rows[ids[1]]["status"] == "bad_request" and "https://example.invalid/d.npy?" in rows[ids[1]]["error"]
    assert "outside the output root" in rows[ids[1]]["error"]
    assert rows[ids[1]]["direction_uri"].startswith("https://example.invalid/d.npy?X-Amz-Signature=REDACTED")
    assert rows[ids[2]]["status"] == "bad_request" and "editor.pt?X-Amz-Signature=REDACTED" in rows[ids[2]]["error"]
    assert rows[ids[4]]["status"] == "bad_request" and "strength is NaN" in rows[ids[4]]["error"]
    assert rows[ids[5]]["status"] == "ok" and rows[ids[5]]["direction_uri"].endswith("/d?token=REDACTED")
    record = json.loads(open(glob.glob(os.path.join(out, "_runs", "*.json"))[0]).read())
    assert "classifier.pt?X-Amz-Signature=REDACTED" in record["summary"]["classifier"]["uri"]
    assert "REDACTED" in record["config"]["model"]["checkpoint"]
    assert os.path.exists(os.path.join(out, "report", "index.html"))
