"""Analytics over the latents (issue 21): scores, identity embeddings, neighbours and
near-duplicates, as Ray jobs writing Delta tables that engines read without this project."""
from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from jobs import score
from jobs.cli import load_config
from pipeline import delta
from pipeline.score_stage import safe_columns
from tests.editing_data import commit_model, rule, train_classifier, write_latents

SCORE_ATTRS = ["Smiling", "Eyeglasses", "5_o_Clock_Shadow"]


def _classifier(w: np.ndarray, labels: np.ndarray, steps: int = 200, seed: int = 0) -> dict:
    state = train_classifier(w, labels, steps=steps, seed=seed)
    state["opts"]["classifier"]["attributes"] = list(SCORE_ATTRS)
    return state


@pytest.fixture(scope="module")
def scored_data(tmp_path_factory, tiny_checkpoint):
    root = str(tmp_path_factory.mktemp("analytics") / "ds")
    lat = write_latents(root, tiny_checkpoint[1])
    labels = rule(lat["w"])
    clf = commit_model(root, "classifier", _classifier(lat["w"], labels), "classifier.pt")
    return {"root": root, **lat, "labels": labels, "classifier": clf}


def _cfg(settings, **sets):
    return load_config(settings, None, [f"{k}={v}" for k, v in {"progress": "false", **sets}.items()])


def test_safe_columns():
    assert safe_columns(["Smiling", "5_o_Clock_Shadow", "Wearing Hat", "x-y"]) == {
        "Smiling": "Smiling", "5_o_Clock_Shadow": "a_5_o_Clock_Shadow", "Wearing Hat": "Wearing_Hat", "x-y": "x_y"}
    with pytest.raises(ValueError, match="another column"):
        safe_columns(["a b", "a-b"])
    with pytest.raises(ValueError, match="another column"):
        safe_columns(["status"])


def test_score_job(ray_local, scored_data, tmp_path):
    import duckdb
    from deltalake import DeltaTable

    from stmodel.classifier import load_classifier

    root = scored_data["root"]
    res = score.run(_cfg(score.SETTINGS, latents=root, **{"score.batch_size": 128}))
    n = len(scored_data["ids"])
    assert res["counts"] == {"in": n, "ok": n, "failed": 0, "skipped": 0}
    assert res["extra"]["columns"] == {"Smiling": "Smiling", "Eyeglasses": "Eyeglasses",
                                       "5_o_Clock_Shadow": "a_5_o_Clock_Shadow"}
    t = delta.read_snapshot_arrow(root, "scores")
    assert t.num_rows == n and set(t["classifier_sha256"].to_pylist()) == {scored_data["classifier"]["sha256"]}
    assert set(t["classifier_run_id"].to_pylist()) == {scored_data["classifier"]["run_id"]}
    # the probabilities are the classifier's, row by row
    order = {k: i for i, k in enumerate(scored_data["ids"])}
    idx = np.array([order[i] for i in t["image_id"].to_pylist()])
    clf = load_classifier(scored_data["classifier"]["uri"])
    with torch.no_grad():
        want = torch.sigmoid(clf(torch.from_numpy(scored_data["w"][idx]))[0]).numpy()
    got = np.stack([t[c].to_numpy() for c in ("Smiling", "Eyeglasses", "a_5_o_Clock_Shadow")], 1)
    np.testing.assert_allclose(got, want, atol=1e-5)
    acc = ((got > 0.5) == scored_data["labels"][idx]).mean()
    assert acc > 0.9, acc
    # the README's query, in DuckDB over the committed snapshot
    scores = DeltaTable(f"{root}/scores").to_pyarrow_dataset()  # noqa: F841 - DuckDB reads it by name
    both = duckdb.sql("SELECT count(*) FROM scores WHERE Smiling > 0.5 AND Eyeglasses > 0.5").fetchall()[0][0]
    assert both == int(((got[:, 0] > 0.5) & (got[:, 1] > 0.5)).sum()) and 0 < both < n

    # rerun: every face is done with this classifier
    again = score.run(_cfg(score.SETTINGS, latents=root))
    assert again["counts"] == {"in": n, "ok": 0, "failed": 0, "skipped": n}
    # a new classifier scores every face again; one row per face, the newest classifier's
    v2 = commit_model(root, "classifier", _classifier(scored_data["w"], scored_data["labels"], steps=50, seed=3),
                      "classifier.pt")
    r2 = score.run(_cfg(score.SETTINGS, latents=root))
    assert r2["counts"] == {"in": n, "ok": n, "failed": 0, "skipped": 0}
    t2 = delta.read_snapshot_arrow(root, "scores")
    assert t2.num_rows == n and set(t2["classifier_sha256"].to_pylist()) == {v2["sha256"]}
    # pinned to the first classifier's run (resolved as jobs.edit resolves it), into another output
    out = str(tmp_path / "pinned")
    r3 = score.run(_cfg(score.SETTINGS, latents=root, output=out, classifier_run=scored_data["classifier"]["run_id"]))
    assert r3["counts"]["ok"] == n and r3["extra"]["classifier"]["sha256"] == scored_data["classifier"]["sha256"]
    with pytest.raises(SystemExit, match="no committed classifier"):
        score.run(_cfg(score.SETTINGS, latents=root, classifier_run="no-such-run"))
    failed = delta.read_snapshot_arrow(root, "scores", filter_expr=pc.field("status") != "ok")
    assert failed.num_rows == 0
