"""No URI secret (userinfo, a presigned query) reaches what the jobs write: run records, table
rows, log lines, the summary line, the report."""
from __future__ import annotations

import glob
import hashlib
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
    (f"cannot read 'https://u:{SECRET}@h/x.npy?sig={SECRET}': gone", "cannot read 'https://h/x.npy?sig=REDACTED': gone"),
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


def test_model_name_drops_the_query_string():
    from pipeline.models import _name

    assert _name({"checkpoint": f"https://u:{SECRET}@h/m/ckpt.pt?{SIGNED}"}) == "ckpt.pt"
    assert SECRET not in _name({"name": f"mine?token={SECRET}", "checkpoint": "/x.pt"})
    assert redact_uri(f"https://h/m/ckpt.pt?{SIGNED}").startswith("https://h/m/ckpt.pt?")
