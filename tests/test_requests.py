"""Edit requests before any edit runs (no Ray): values that do not parse are bad requests, an
unknown column stops the job, direction files only from allowed roots and under a size cap."""
from __future__ import annotations

import os

import numpy as np
import pytest

from jobs.settings.edit import Settings
from pipeline.config import defaults
from pipeline.edit_requests import (
    EditContext,
    check_columns,
    direction_refusal,
    is_under,
    normalize_request,
    prepare_requests,
    read_requests,
)
from pipeline.errors import JobError
from tests.editing_data import ATTRS, NL, D

LABEL = {"image_id": "ab" * 32, "kind": "label", "attribute": "Smiling"}


def _ctx(roots=(), max_bytes: int | None = None) -> EditContext:
    max_bytes = defaults(Settings).direction_max_bytes if max_bytes is None else max_bytes
    return EditContext("ckpt", "clf", ATTRS, {"Smiling": "ed"}, {}, NL, D, list(roots), max_bytes)


@pytest.mark.parametrize("field", ["strength", "face_index", "target", "order", "reference_face_index"])
@pytest.mark.parametrize("value", [float("nan"), "NaN", "nan", "NA", "N/A", "null", "lots", "inf", True])
def test_bad_numbers_are_bad_requests(field, value):
    _, err = normalize_request({**LABEL, field: value})
    assert err is not None and err.startswith(field), err
    assert ("NaN" in err) if (isinstance(value, float) or str(value).lower() == "nan") else (repr(value) in err)


@pytest.mark.parametrize("field", ["target", "order", "reference_face_index"])
def test_bad_number_in_a_field_the_kind_ignores(field):
    req = {"image_id": "ab" * 32, "kind": "direction", "direction_uri": "/x/d.npy", field: "NA"}
    assert normalize_request(req)[1].startswith(field)


def test_nan_strength_is_not_the_default():
    t = prepare_requests([{**LABEL, "strength": float("nan")}, {**LABEL, "strength": 1.0},
                          {**LABEL, "strength": "NaN"}, {**LABEL, "face_index": float("nan")}, dict(LABEL)], _ctx())
    rows = t.to_pylist()
    assert [r["status"] for r in rows] == ["bad_request", "ok", "bad_request", "bad_request", "skipped"]
    assert "strength is NaN" in rows[0]["error"] and rows[0]["strength"] is None
    assert "face_index is NaN" in rows[3]["error"] and rows[3]["face_index"] is None
    assert rows[0]["edit_id"] != rows[1]["edit_id"]  # not the id of an explicit 1.0
    assert rows[4]["edit_id"] == rows[1]["edit_id"]  # an empty strength is the documented default 1.0


@pytest.mark.parametrize("empty", [None, "", "  "])
def test_empty_optional_cells_take_their_documented_defaults(empty):
    req, err = normalize_request({**LABEL, "strength": empty, "face_index": empty, "target": empty, "order": empty})
    assert err is None and (req["strength"], req["face_index"], req["target"], req["order"]) == (1.0, 0, 1, 1)
    r, err = normalize_request({"image_id": "ab" * 32, "kind": "reference", "attribute": "Smiling",
                                "reference_image_id": "cd" * 32, "reference_face_index": empty})
    assert err is None and r["reference_face_index"] == 0


@pytest.mark.parametrize("field,row", [
    ("image_id", {"kind": "label", "attribute": "Smiling"}),
    ("kind", {"image_id": "ab"}),
    ("attribute", {"image_id": "ab", "kind": "label"}),
    ("reference_image_id", {"image_id": "ab", "kind": "reference", "attribute": "Smiling"}),
    ("direction_uri", {"image_id": "ab", "kind": "direction"}),
])
def test_empty_required_cells_are_bad_requests(field, row):
    _, err = normalize_request({**row, field: " "})
    assert err is not None and field in err, err


def test_csv_na_spellings_reach_the_parser(tmp_path):
    """pyarrow reads "NA" / "NaN" cells as nulls by default, which would mean "default": the
    requests reader keeps them as values, so they are refused."""
    p = tmp_path / "r.csv"
    p.write_text("image_id,kind,attribute,strength,face_index,target\n"
                 "aa,label,Smiling,NaN,0,1\n"
                 "bb,label,Smiling,NA,0,\n"
                 "cc,label,Smiling,,NA,1\n"
                 "dd,label,Smiling,2,,N/A\n"
                 "ee,label,Smiling,,,\n")
    t = prepare_requests(read_requests(str(p)), _ctx())
    assert t["status"].to_pylist() == ["bad_request"] * 4 + ["ok"]
    errs = t["error"].to_pylist()
    assert "strength is NaN" in errs[0] and "strength must be a number, got 'NA'" in errs[1]
    assert "face_index must be an integer, got 'NA'" in errs[2] and "target must be an integer" in errs[3]
    assert t["strength"].to_pylist()[4] == 1.0


@pytest.mark.parametrize("column,near", [("strenght", "strength"), ("face_idx", "face_index"),
                                         ("Direction_URI", "direction_uri"), ("notes", None)])
def test_unknown_column_stops_the_job_with_the_nearest_name(tmp_path, column, near):
    p = tmp_path / "r.csv"
    p.write_text(f"image_id,kind,attribute,{column}\naa,label,Smiling,2\n")
    with pytest.raises(JobError) as e:
        read_requests(str(p))
    msg = str(e.value)
    assert repr(column) in msg and (f"did you mean {near!r}" in msg if near else "did you mean" not in msg)
    check_columns(["image_id", "kind", "strength"])  # known columns pass


@pytest.mark.parametrize("uri,roots,ok", [
    ("/ok/d.npy", ["/ok"], True),
    ("/ok/sub/d.npy", ["/ok/"], True),
    ("/ok/../../x.npy", ["/ok"], False),
    ("/ok/../etc/d.npy", ["/ok"], False),
    ("/okay/d.npy", ["/ok"], False),
    ("/ok", ["/ok"], False),                              # the root itself is no object under it
    ("file:///ok/d.npy", ["/ok"], True),
    ("s3://bucket/d.npy", ["s3://bucket"], True),
    ("s3://bucket/a/../d.npy", ["s3://bucket/a"], False),
    ("s3://bucket-evil/x.npy", ["s3://bucket"], False),
    ("s3://Bucket/d.npy", ["s3://bucket/"], True),         # host names compare case-blind
    ("gs://bucket/d.npy", ["s3://bucket"], False),
    ("s3://bucket/d.npy", ["/ok", "s3://other"], False),
    ("http://169.254.169.254/latest/d.npy", ["/ok"], False),
    ("https://host/dirs/d.npy", ["https://host/dirs"], True),
    ("https://host/dirs/%2e%2e/secret.npy", ["https://host/dirs"], False),
    ("https://user:pw@host/dirs/d.npy", ["https://host/dirs"], True),
    ("https://host.evil/dirs/d.npy", ["https://host"], False),
    ("simplecache::s3://bucket/d.npy", ["s3://bucket"], False),
    ("/ok/d.npy", [], False),
])
def test_direction_roots(uri, roots, ok):
    assert is_under(uri, roots) is ok


def test_direction_symlink_out_of_a_root_is_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    np.save(outside / "d.npy", np.zeros(D, np.float32))
    os.symlink(outside, root / "link")
    assert not is_under(str(root / "link" / "d.npy"), [str(root)])
    assert is_under(str(outside / "d.npy"), [str(outside)])


def test_direction_refusals_are_bad_requests_with_a_redacted_uri(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    good, big = root / "good.npy", root / "big.npy"
    np.save(good, np.ones(D, np.float32))
    big.write_bytes(b"\0" * 2048)
    assert direction_refusal(str(good), [str(root)], 2048) is None
    assert "over direction_max_bytes=1024" in direction_refusal(str(big), [str(root)], 1024)
    assert "not found" in direction_refusal(str(root / "missing.npy"), [str(root)], 1024)
    secret = "https://user:TOPSECRET@host/d.npy?X-Amz-Signature=TOPSECRET&X-Amz-Credential=TOPSECRET"
    rows = [{"image_id": "ab" * 32, "kind": "direction", "direction_uri": u}
            for u in (str(good), str(big), str(tmp_path / "elsewhere.npy"), secret, f"{root}/../elsewhere.npy")]
    t = prepare_requests(rows, _ctx([str(root)], max_bytes=1024))
    assert t["status"].to_pylist() == ["ok"] + ["bad_request"] * 4
    errs = t["error"].to_pylist()
    assert "over direction_max_bytes" in errs[1]
    assert all("outside the output root and the allowed prefixes" in e for e in errs[2:])
    assert "TOPSECRET" not in errs[3] and "https://host/d.npy" in errs[3]
    # the file over the cap was never opened: its bytes are not a .npy, yet the error is the size
    assert "cannot read" not in errs[1]

