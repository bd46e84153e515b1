"""The edit job end to end (Ray Data): requests joined with the committed Delta `latents`
snapshot in Ray, models resolved from committed `models` rows, the `edits` Delta table written
by the workers; reruns skip done edits, a retrained model makes new edits."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from jobs import edit
from jobs.cli import load_config
from pipeline import delta, model_registry, storage
from pipeline.errors import JobError
from pipeline.runner import JobRun
from tests.editing_data import (
    ATTRS,
    NL,
    D,
    commit_model,
    editor_state_for,
    rule,
    train_classifier,
    write_latents,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_checkpoint):
    """Latents and, under the same root, a classifier and a Smiling editor committed as the fit
    jobs commit them."""
    ckpt, digest = tiny_checkpoint
    base = tmp_path_factory.mktemp("editjob")
    root = str(base / "ds")
    lat = write_latents(root, digest)
    labels = rule(lat["w"])
    clf_state = train_classifier(lat["w"], labels)
    clf = commit_model(root, "classifier", clf_state, "classifier.pt")
    ed = commit_model(root, "editor", editor_state_for(clf_state, "Smiling"), "editor_Smiling.pt", "Smiling")
    return {"root": root, "ckpt": ckpt, "digest": digest, "base": base, **lat, "labels": labels,
            "clf_state": clf_state, "classifier": clf, "editor": ed}


def _cfg(**sets):
    return load_config(edit.SETTINGS, None, [f"{k}={v}" for k, v in {"progress": "false", **sets}.items()])


def _edit_cfg(data, output, **sets):
    base = {"latents": data["root"], "output": output, "model.checkpoint": data["ckpt"],
            "classifier": data["root"], "editors": data["root"], "metric_weights.allow_random_init": "true",
            "edit.batch_size": 16}
    return _cfg(**{**base, **sets})


def _edits(out: str):
    return delta.read_snapshot_arrow(out, "edits")


def _balanced(c: dict) -> bool:
    return c["in"] == c["ok"] + c["failed"] + c["skipped"]


def test_requests_are_normalised_and_keyed():
    from pipeline.edit_requests import (
        EditContext,
        edit_id,
        edit_models,
        normalize_request,
    )

    a, err = normalize_request({"image_id": "AB" * 32, "kind": "Label", "attribute": "Smiling", "strength": "2",
                                "reference_image_id": "ignored for a label edit"})
    assert err is None and a["target"] == 1 and a["order"] == 1 and a["face_index"] == 0
    assert a["image_id"] == "ab" * 32 and a["strength"] == 2.0 and a["reference_image_id"] is None
    b, _ = normalize_request({"image_id": "ab" * 32, "kind": "label", "attribute": "Smiling", "strength": 2.0,
                              "target": 1, "order": 1, "face_index": 0.0})
    assert edit_id(a) == edit_id(b) and len(edit_id(a)) == 64
    assert edit_id(a) != edit_id({**b, "strength": 2.5})
    # the models that make the edit are part of its id
    ctx = EditContext("ckpt", "clf1", ATTRS, {"Smiling": "ed1"}, {}, NL, D, [], 1024)
    ctx2 = EditContext("ckpt", "clf2", ATTRS, {"Smiling": "ed1"}, {}, NL, D, [], 1024)
    assert edit_id(a, edit_models(a, ctx)) != edit_id(a, edit_models(a, ctx2))
    assert edit_id(a, edit_models(a, ctx)) != edit_id(a, edit_models(a, EditContext("ckpt2", "clf1", ATTRS, {}, {},
                                                                                    NL, D, [], 1024)))
    r, _ = normalize_request({"image_id": "ab" * 32, "kind": "reference", "attribute": "Smiling",
                              "reference_image_id": "cd" * 32})
    assert edit_id(r, edit_models(r, ctx)) == edit_id(r, edit_models(r, ctx2))  # no classifier in a reference edit
    assert "bad kind" in normalize_request({"image_id": "x", "kind": "morph"})[1]
    assert "target must be one of" in normalize_request({"image_id": "x", "kind": "label", "attribute": "a",
                                                         "target": 5})[1]
    assert "strength must be" in normalize_request({"image_id": "x", "kind": "direction", "direction_uri": "d.npy",
                                                    "strength": "lots"})[1]


def test_edit_job_end_to_end_local(ray_local, data, tmp_path):
    ids, labels = data["ids"], data["labels"]
    s = ATTRS.index("Smiling")
    d1 = str(tmp_path / "smile_dir.npy")
    np.save(d1, np.random.default_rng(5).standard_normal(D).astype(np.float32))
    d2 = str(tmp_path / "per_layer.pt")
    torch.save(torch.randn(NL, D, generator=torch.Generator().manual_seed(6)), d2)
    garbage = str(tmp_path / "garbage.npy")
    open(garbage, "wb").write(b"not a numpy file")
    rows = []
    for i in range(24):  # label edits towards the opposite of the rule's label
        rows.append({"image_id": ids[i], "kind": "label", "attribute": "Smiling", "strength": 2.0,
                     "target": int(1 - labels[i, s]), "order": 2 if i < 4 else 1})
    rows += [{"image_id": ids[30 + j], "kind": "reference", "attribute": "Smiling",
              "reference_image_id": ids[40 + j], "strength": 1.0} for j in range(3)]
    rows += [{"image_id": ids[50], "kind": "direction", "direction_uri": d1, "attribute": "Male", "strength": 1.5},
             {"image_id": ids[51], "kind": "direction", "direction_uri": d2, "strength": -1.0}]
    bad = [
        ({"image_id": "f" * 64, "kind": "label", "attribute": "Smiling"}, "bad_request", "unknown image"),
        ({"image_id": ids[1], "kind": "label", "attribute": "Bald"}, "bad_request", "unknown attribute 'Bald'"),
        ({"image_id": ids[2], "kind": "reference", "attribute": "Smiling", "reference_image_id": "e" * 64},
         "bad_request", "reference image not found"),
        ({"image_id": ids[3], "kind": "reference", "attribute": "Male", "reference_image_id": ids[4]},
         "bad_request", "no editor for attribute 'Male'"),
        ({"image_id": ids[5], "kind": "direction", "direction_uri": str(tmp_path / "missing.npy")},
         "bad_request", "cannot read direction file"),
        ({"image_id": ids[6], "kind": "direction", "direction_uri": garbage}, "bad_request",
         "cannot read direction file"),
        ({"image_id": ids[7], "kind": "morph", "attribute": "Smiling"}, "bad_request", "bad kind 'morph'"),
        ({"image_id": ids[8], "kind": "label", "attribute": "Smiling", "target": 5}, "bad_request",
         "target must be one of"),
    ]
    rows += [b[0] for b in bad]
    rows.append(dict(rows[0]))  # the same request twice: done once, counted skipped
    import pandas as pd

    req = str(tmp_path / "requests.csv")
    pd.DataFrame(rows).to_csv(req, index=False)
    out = str(tmp_path / "edited")
    res = edit.run(_edit_cfg(data, out, requests=req, direction_prefixes=f"[{tmp_path}]"))
    n_ok = 24 + 3 + 2
    assert res["counts"] == {"in": len(rows), "ok": n_ok, "failed": len(bad), "skipped": 1}
    assert res["extra"]["classifier"]["run_id"] == data["classifier"]["run_id"]
    assert res["extra"]["editors"]["Smiling"]["sha256"] == data["editor"]["sha256"]
    t = _edits(out)
    assert t.num_rows == n_ok + len(bad) and len(set(t["edit_id"].to_pylist())) == t.num_rows
    by_err = {r["image_id"]: r for r in t.filter(pc.not_equal(t["status"], "ok")).to_pylist()}
    for req_row, status, msg in bad:
        got = by_err[req_row["image_id"]]
        assert got["status"] == status and msg in got["error"], (msg, got["error"])
        assert got["output_uri"] is None
    ok = t.filter(pc.equal(t["status"], "ok")).to_pylist()
    for r in ok:
        assert r["output_uri"] == os.path.join(out, "edit_images", f"{r['edit_id']}.png")
        assert os.path.exists(r["output_uri"])
        assert r["source_reconstruction_uri"] == os.path.join(out, "edit_sources", f"{r['image_id']}_0.png")
        assert os.path.exists(r["source_reconstruction_uri"])
        assert np.isfinite(r["lpips"]) and -1 <= r["id_similarity"] <= 1 and "RANDOM-INIT" in r["metric_backbones"]
        assert r["checkpoint_sha256"] == data["digest"] and r["run_id"] == res["run_id"]
    lab = [r for r in ok if r["kind"] == "label"]
    moved = [(r["logit_after"] > r["logit_before"]) == (r["target"] == 1) for r in lab]
    rate = float(np.mean(moved))
    print(f"\nlabel edits (strength 2, towards the opposite label): logit moved the asked way in "
          f"{rate:.3f} of {len(lab)}; mean |change| "
          f"{np.mean([abs(r['logit_after'] - r['logit_before']) for r in lab]):.2f}")
    assert rate >= 0.8
    ex = res["extra"]
    assert ex["label_moved_rate"] == pytest.approx(rate, abs=1e-4)
    assert ex["by_kind"] == {"label": 24, "reference": 3, "direction": 2}
    assert ex["lpips"]["n"] == n_ok and ex["statuses"] == {"ok": n_ok, "bad_request": len(bad)}
    refs = [r for r in ok if r["kind"] == "reference"]
    assert len(refs) == 3 and all(r["logit_before"] is not None for r in refs)
    dirs = {r["image_id"]: r for r in ok if r["kind"] == "direction"}
    assert dirs[ids[50]]["logit_after"] is not None and dirs[ids[51]]["logit_after"] is None  # no attribute given
    # rerun (the same requests as Parquet: same edit_ids): everything is done (bad requests are
    # permanent failures)
    req_pq = str(tmp_path / "requests.parquet")
    pd.read_csv(req).to_parquet(req_pq)
    res2 = edit.run(_edit_cfg(data, out, requests=req_pq, direction_prefixes=f"[{tmp_path}]"))
    assert res2["counts"] == {"in": len(rows), "ok": 0, "failed": 0, "skipped": len(rows)}
    # retry_failed: the failed requests are tried again (and fail again), replacing their rows
    res3 = edit.run(_edit_cfg(data, out, requests=req, retry_failed="true", direction_prefixes=f"[{tmp_path}]"))
    assert res3["counts"] == {"in": len(rows), "ok": 0, "failed": len(bad), "skipped": n_ok + 1}
    t3 = _edits(out)
    assert t3.num_rows == n_ok + len(bad)
    assert {r["run_id"] for r in t3.filter(pc.not_equal(t3["status"], "ok")).to_pylist()} == {res3["run_id"]}
    assert all(_balanced(x["counts"]) for x in (res, res2, res3))
    runs = [json.loads(open(p).read()) for p in storage.list_files(storage.join(out, "_runs"))]
    assert sorted(r["run_id"] for r in runs) == sorted(x["run_id"] for x in (res, res2, res3))


def test_latest_committed_model_and_retrained_model(ray_local, data, tmp_path):
    """Edits resolve the newest committed classifier; a retrained classifier gives label edits new
    edit_ids (edited again, not skipped), the others keep theirs; an unpublished model file (a
    fit run that died before its commit) is never used; `classifier_run` pins a run."""
    models = str(tmp_path / "models")
    v1 = commit_model(models, "classifier", data["clf_state"], "classifier.pt")
    commit_model(models, "editor", editor_state_for(data["clf_state"], "Smiling"), "editor_Smiling.pt", "Smiling")
    ids = data["ids"]
    rows = [{"image_id": ids[100 + i], "kind": "label", "attribute": "Young", "strength": 1.0} for i in range(3)]
    rows += [{"image_id": ids[110], "kind": "reference", "attribute": "Smiling", "reference_image_id": ids[111]}]
    import pandas as pd

    req = str(tmp_path / "requests.csv")
    pd.DataFrame(rows).to_csv(req, index=False)
    # a fit run that wrote its file after v1 and died before committing: not a model
    dead = JobRun(models, "fit_classifier")
    from stmodel.checkpoint import save_obj

    save_obj(train_classifier(data["w"][:64], data["labels"][:64], steps=5, seed=9),
             storage.join(models, model_registry.model_key("classifier", dead.run_id, "classifier.pt")))
    out = str(tmp_path / "edited")
    sets = {"requests": req, "classifier": models, "editors": models, "metrics": "false"}
    r1 = edit.run(_edit_cfg(data, out, **sets))
    assert r1["counts"] == {"in": 4, "ok": 4, "failed": 0, "skipped": 0}
    assert r1["extra"]["classifier"]["run_id"] == v1["run_id"]
    # retrained and committed: the newest, and the label edits are new edits
    v2 = commit_model(models, "classifier", train_classifier(data["w"], data["labels"], steps=150, seed=1),
                      "classifier.pt")
    assert v2["sha256"] != v1["sha256"]
    r2 = edit.run(_edit_cfg(data, out, **sets))
    assert r2["extra"]["classifier"]["run_id"] == v2["run_id"]
    assert r2["counts"] == {"in": 4, "ok": 3, "failed": 0, "skipped": 1}
    t = _edits(out)
    assert t.num_rows == 7
    assert sorted(t.filter(pc.equal(t["kind"], "label"))["run_id"].to_pylist()) == sorted([r1["run_id"]] * 3
                                                                                          + [r2["run_id"]] * 3)
    # pinned to the first classifier: all done
    r3 = edit.run(_edit_cfg(data, out, classifier_run=v1["run_id"], **sets))
    assert r3["extra"]["classifier"]["run_id"] == v1["run_id"]
    assert r3["counts"] == {"in": 4, "ok": 0, "failed": 0, "skipped": 4}
    assert all(_balanced(x["counts"]) for x in (r1, r2, r3))


def test_edit_sweep_on_s3(ray_local, s3_bucket, data, tmp_path):
    """A sweep over every face of a latents table on S3, models committed on S3: a killed run
    publishes nothing, a file given with its sha256 is the same model as the committed row."""
    import s3fs

    fs = s3fs.S3FileSystem()
    root = f"{s3_bucket}/ds"
    write_latents(root, data["digest"], n=5)
    fs.put(data["ckpt"], f"{s3_bucket[5:]}/checkpoints/tiny.pt")
    clf = commit_model(root, "classifier", data["clf_state"], "classifier.pt")
    out = f"{s3_bucket}/edited"
    sets = {"latents": root, "output": out, "model.checkpoint": f"{s3_bucket}/checkpoints/tiny.pt",
            "model.sha256": data["digest"], "classifier": root, "metric_weights.allow_random_init": "true",
            "requests": "null", "sweep.image_ids": "all", "sweep.attributes": "[Young]",
            "sweep.strengths": "[1.0,2.0]", "sweep.targets": "[0,1]"}

    def die(run):
        raise KeyboardInterrupt("killed before publishing")

    with pytest.raises(KeyboardInterrupt):
        edit.run(_cfg(**sets), before_commit=die)
    assert delta.open_table(out, "edits") is None  # data files written, no commit: invisible
    with pytest.raises(JobError, match="give its sha256"):
        edit.run(_cfg(**{**sets, "classifier": clf["uri"]}))
    res = edit.run(_cfg(**{**sets, "classifier": clf["uri"], "classifier_sha256": clf["sha256"]}))
    assert res["counts"] == {"in": 20, "ok": 20, "failed": 0, "skipped": 0}
    t = _edits(out)
    assert t.num_rows == 20 and set(t["status"].to_pylist()) == {"ok"}
    for u in t["output_uri"].to_pylist() + t["source_reconstruction_uri"].to_pylist():
        assert u.startswith(f"{out}/edit_") and fs.exists(u)
    assert len(fs.ls(f"{out[5:]}/edit_sources")) == 5
    assert len(fs.ls(f"{out[5:]}/_runs")) == 1
    res2 = edit.run(_cfg(**sets))  # the committed row of the same file: the same edits, all done
    assert res2["counts"] == {"in": 20, "ok": 0, "failed": 0, "skipped": 20}


def test_edit_settings_ranges_rules_and_preflight(tmp_path):
    """No Ray: what stops the job before it starts (exit 2), and the checks of `check`."""
    from pipeline.config import SettingsError

    with pytest.raises(SettingsError) as e:
        _cfg(**{"sweep.targets": "[1,2]", "direction_max_bytes": 0, "edit.join_partitions": 0})
    assert sorted(m.split(":")[0] for m in e.value.errors) == ["direction_max_bytes", "edit.join_partitions",
                                                                 "sweep.targets"]
    with pytest.raises(SettingsError, match="direction: direction=NAME makes a sweep"):
        _cfg(direction="pca_0", requests="r.csv")
    assert _cfg(**{"edit.join_partitions": "null"}).edit.join_partitions is None
    errs = edit.check(_cfg(latents=str(tmp_path / "none")))
    assert [m.split(":")[0] for m in errs] == ["latents", "output", "model.checkpoint", "metrics", "requests"]
    ok = {"latents": str(tmp_path), "output": str(tmp_path / "out"), "model.preset": "tiny-32",
          "metric_weights.skip_missing": "true"}
    assert edit.check(_cfg(**ok, requests="r.csv")) == []
    assert edit.check(_cfg(**ok, direction="pca_0")) == []
    assert edit.check(_cfg(**{**ok, "sweep.attributes": "[Smiling]", "metrics": "false",
                              "metric_weights.skip_missing": "false"})) == []


def test_cli_help():
    h = subprocess.run([sys.executable, "-m", "jobs.edit", "--help"], capture_output=True, text=True, check=True,
                       timeout=120)
    assert "sweep:" in h.stdout and "--set" in h.stdout
