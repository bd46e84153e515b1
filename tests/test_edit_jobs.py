"""The editing jobs end to end: fit_classifier, fit_editor (Ray Train) and edit (Ray Data),
on a latents table of tiny-32 codes (8 x 64) whose attributes follow a known rule."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from jobs import edit, fit_classifier, fit_editor
from jobs.cli import load_config
from pipeline import storage
from pipeline.fit_loops import auc_score
from pipeline.schemas import latents_schema, make_table

NL, D = 8, 64                      # tiny-32 W+
N_IMG = 800                        # ok codes in the latents table
ATTRS = ["Smiling", "Male", "Young"]
# one direction per attribute, the same in every layer (as W codes broadcast to W+ would carry it)
U = np.tile(np.random.default_rng(123).standard_normal((len(ATTRS), 1, D)), (1, NL, 1)).reshape(len(ATTRS), -1)
NO_LABELS = 10                     # the last ok codes have no row in the attributes table


def _iid(i: int) -> str:
    return hashlib.sha256(f"image-{i}".encode()).hexdigest()


def _rule(w: np.ndarray) -> np.ndarray:
    """The attributes: sign of the projection of the flattened code on fixed random vectors."""
    return (w.reshape(len(w), -1) @ U.T > 0).astype(np.int64)


def _codes(n: int, seed: int) -> np.ndarray:
    """W-like codes: one vector per image broadcast to the layers, plus per-layer noise."""
    r = np.random.default_rng(seed)
    return (r.standard_normal((n, 1, D)) + 0.5 * r.standard_normal((n, NL, D))).astype(np.float32)


def write_latents(root: str, ckpt_sha: str) -> dict:
    """A committed latents table: N_IMG ok codes + 2 failed inversions (as jobs.invert writes)."""
    w = np.concatenate([_codes(N_IMG, 0), np.zeros((2, NL, D), np.float32)])
    n = len(w)
    ok = np.arange(n) < N_IMG
    cols = {"image_id": [_iid(i) for i in range(n)], "face_index": [0] * n,
            "source_uri": [f"s3://raw/photo_{i:05d}.jpg" for i in range(n)],
            "status": ["ok" if o else "decode_error" for o in ok],
            "error": [None if o else "not an image" for o in ok],
            "model": ["tiny32.pt"] * n, "checkpoint_sha256": [ckpt_sha] * n}
    run = storage.Run(root, "invert", {})
    run.write_table("latents", make_table(cols, latents_schema(NL, D), run.run_id, w_plus=w, ok=ok))
    run.commit({"in": n})
    return {"w": w[:N_IMG], "ids": cols["image_id"][:N_IMG]}


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_checkpoint):
    ckpt, digest = tiny_checkpoint
    base = tmp_path_factory.mktemp("editjobs")
    root = str(base / "ds")
    lat = write_latents(root, digest)
    labels = _rule(lat["w"])
    rows = []
    for i in range(N_IMG - NO_LABELS):
        rows.append({"image_id": lat["ids"][i], **{a: int(2 * labels[i, k] - 1) for k, a in enumerate(ATTRS)}})
    rows[5]["Male"] = 7  # not a label: that row fails with a clear reason
    for j in range(3):   # labels of images that were never inverted
        rows.append({"image_id": _iid(10_000 + j), **{a: 1 for a in ATTRS}})
    import pandas as pd

    csv = str(base / "attributes.csv")
    pd.DataFrame(rows).to_csv(csv, index=False)
    return {"root": root, "attributes": csv, "ckpt": ckpt, "digest": digest, "base": base, **lat,
            "labels": labels}


def _cfg(job, **sets):
    return load_config(job.DEFAULTS, None, [f"{k}={v}" for k, v in {"progress": "false", **sets}.items()])


@pytest.fixture(scope="module")
def classifier(ray_local, data):
    out = str(data["base"] / "clf")
    res = fit_classifier.run(_cfg(
        fit_classifier, latents=data["root"], attributes=data["attributes"], output=out,
        val_fraction=0.2, **{"classifier.hidden": "[256,64]", "train.epochs": 10, "train.batch_size": 64,
                             "train.lr": 1e-3, "train.ray_storage": str(data["base"] / "ray_results")}))
    return {"out": out, "res": res, "uri": res["extra"]["classifier"]}


def test_auc_rank_formula():
    assert auc_score(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auc_score(np.array([1.0, 1.0, 1.0]), np.array([0, 1, 1])) == 0.5  # ties: average ranks
    assert np.isnan(auc_score(np.array([0.2, 0.3]), np.array([1, 1])))


def test_fit_classifier(classifier, data):
    res = classifier["res"]
    c = res["counts"]
    assert c == {"in": N_IMG + 2, "ok": N_IMG - NO_LABELS - 1, "failed": NO_LABELS + 1, "skipped": 2}
    ex = res["extra"]
    assert ex["errors"] == {"no labels": NO_LABELS, "invalid label value (not 0/1/-1/bool) in Male": 1}
    assert ex["labels_without_latents"] == 3
    assert ex["attributes"] == ["Male", "Smiling", "Young"]  # CelebA's order
    ev = storage.read_committed(classifier["out"], "classifier_eval").to_pylist()
    assert [r["attribute"] for r in ev] == ex["attributes"]
    for r in ev:
        print(f"\nclassifier {r['attribute']}: held-out accuracy {r['accuracy']:.3f}, AUC {r['auc']:.3f}, "
              f"n_val {r['n_val']}, positive rate {r['positive_rate']:.2f}")
        assert r["accuracy"] >= 0.85 and r["auc"] >= 0.9  # chance: 0.5
        assert r["n_val"] + r["n_train"] == c["ok"] and 0.12 < r["n_val"] / c["ok"] < 0.28
    from stmodel.classifier import load_classifier

    clf = load_classifier(classifier["uri"])
    assert clf.attributes == ex["attributes"] and (clf.n_latent, clf.style_dim) == (NL, D)
    assert len(storage.committed_manifests(classifier["out"], "fit_classifier")) == 1


@pytest.fixture(scope="module")
def editors(classifier, data):
    out = str(data["base"] / "editors")
    res = fit_editor.run(_cfg(
        fit_editor, classifier=classifier["uri"], output=out, attributes="[Smiling]", latents=data["root"],
        val_fraction=0.25, **{"editor.ff_dim": 128, "train.steps": 150, "train.batch_size": 64,
                              "train.lr": 1e-3, "train.ray_storage": str(data["base"] / "ray_results")}))
    return {"out": out, "res": res}


def test_fit_editor_learns(editors, data):
    res = editors["res"]
    assert res["counts"] == {"in": N_IMG + 2, "ok": N_IMG, "failed": 0, "skipped": 2}
    e = res["extra"]["editors"]["Smiling"]
    print(f"\neditor Smiling (held-out pairs): target-embedding distance to the reference "
          f"{e['ref_before']:.4f} -> {e['ref_after']:.4f} (unchanged source: {e['identity_ref']:.4f}); "
          f"loss {e['loss_before']:.4f} -> {e['loss_after']:.4f}; l2 {e['l2_after']:.4f}")
    assert e["ref_after"] < 0.75 * e["ref_before"]
    assert e["ref_after"] < 0.75 * e["identity_ref"]
    assert e["loss_after"] < e["loss_before"]
    from stmodel.editor import load_editor

    editor, clf, opts = load_editor(e["uri"])
    assert opts["attribute"] == "Smiling" and clf is not None and editor.style_dim == D
    assert e["uri"] == os.path.join(editors["out"], "models", "editor_Smiling.pt")


def test_fit_editor_sampled_codes(classifier, data):
    """Codes drawn through the inversion model's mapping net instead of a latents table."""
    out = str(data["base"] / "editors_sampled")
    res = fit_editor.run(_cfg(
        fit_editor, classifier=classifier["uri"], output=out, attributes="[Young]",
        **{"model.checkpoint": data["ckpt"], "sample.n": 128, "sample.n_val": 32, "sample.mean_n": 256,
           "editor.ff_dim": 64, "train.steps": 4, "train.batch_size": 32,
           "train.ray_storage": str(data["base"] / "ray_results")}))
    assert res["counts"] == {"in": 160, "ok": 160, "failed": 0, "skipped": 0}
    e = res["extra"]["editors"]["Young"]
    assert e["steps"] == 4 and e["pairs"] == 16 and os.path.exists(e["uri"])
    assert res["extra"]["source"]["truncation"] == 0.7


# ---------------------------------------------------------------------------- the edit job

def _edit_cfg(data, classifier, editors, output, **sets):
    base = {"latents": data["root"], "output": output, "model.checkpoint": data["ckpt"],
            "classifier": classifier["uri"], "metric_weights.allow_random_init": "true", "edit.batch_size": 16}
    if editors is not None:
        base["editors.Smiling"] = editors["res"]["extra"]["editors"]["Smiling"]["uri"]
    return _cfg(edit, **{**base, **sets})


def test_requests_are_normalised_and_keyed():
    from pipeline.edit_stage import edit_id, normalize_request

    a, err = normalize_request({"image_id": "AB" * 32, "kind": "Label", "attribute": "Smiling", "strength": "2",
                                "reference_image_id": "ignored for a label edit"})
    assert err is None and a["target"] == 1 and a["order"] == 1 and a["face_index"] == 0
    assert a["image_id"] == "ab" * 32 and a["strength"] == 2.0 and a["reference_image_id"] is None
    b, _ = normalize_request({"image_id": "ab" * 32, "kind": "label", "attribute": "Smiling", "strength": 2.0,
                              "target": 1, "order": 1, "face_index": 0.0})
    assert edit_id(a) == edit_id(b) and len(edit_id(a)) == 64
    assert edit_id(a) != edit_id({**b, "strength": 2.5})
    assert "bad kind" in normalize_request({"image_id": "x", "kind": "morph"})[1]
    assert "target must be one of" in normalize_request({"image_id": "x", "kind": "label", "attribute": "a",
                                                         "target": 5})[1]
    assert "strength must be" in normalize_request({"image_id": "x", "kind": "direction", "direction_uri": "d.npy",
                                                    "strength": "lots"})[1]


def test_edit_job_end_to_end_local(ray_local, data, classifier, editors, tmp_path):
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
    res = edit.run(_edit_cfg(data, classifier, editors, out, requests=req))
    n_ok = 24 + 3 + 2
    assert res["counts"] == {"in": len(rows), "ok": n_ok, "failed": len(bad), "skipped": 1}
    t = storage.read_committed(out, "edits")
    assert t.num_rows == n_ok + len(bad)
    by_err = {r["image_id"]: r for r in t.filter(pc.not_equal(t["status"], "ok")).to_pylist()}
    for req_row, status, msg in bad:
        got = by_err[req_row["image_id"]]
        assert got["status"] == status and msg in got["error"], (msg, got["error"])
        assert got["output_uri"] is None
    ok = t.filter(pc.equal(t["status"], "ok")).to_pylist()
    for r in ok:
        assert r["output_uri"] == os.path.join(out, "edits", "images", f"{r['edit_id']}.png") and os.path.exists(r["output_uri"])
        assert r["source_reconstruction_uri"] == os.path.join(out, "edit_sources", f"{r['image_id']}_0.png")
        assert os.path.exists(r["source_reconstruction_uri"])
        assert np.isfinite(r["lpips"]) and -1 <= r["id_similarity"] <= 1 and "RANDOM-INIT" in r["metric_backbones"]
        assert r["checkpoint_sha256"] == data["digest"]
    lab = [r for r in ok if r["kind"] == "label"]
    moved = [(r["logit_after"] > r["logit_before"]) == (r["target"] == 1) for r in lab]
    rate = float(np.mean(moved))
    print(f"\nlabel edits (strength 2, towards the opposite label): logit moved the asked way in "
          f"{rate:.3f} of {len(lab)}; mean |change| "
          f"{np.mean([abs(r['logit_after'] - r['logit_before']) for r in lab]):.2f}")
    assert rate >= 0.8
    assert res["extra"]["label_moved_rate"] == pytest.approx(rate, abs=1e-4)
    refs = [r for r in ok if r["kind"] == "reference"]
    assert len(refs) == 3 and all(r["logit_before"] is not None for r in refs)
    dirs = {r["image_id"]: r for r in ok if r["kind"] == "direction"}
    assert dirs[ids[50]]["logit_after"] is not None and dirs[ids[51]]["logit_after"] is None  # no attribute given
    # rerun (the same requests as Parquet: same edit_ids): the ok requests are skipped, the
    # failed ones retried (and fail again)
    req_pq = str(tmp_path / "requests.parquet")
    pd.read_csv(req).to_parquet(req_pq)
    res2 = edit.run(_edit_cfg(data, classifier, editors, out, requests=req_pq))
    assert res2["counts"] == {"in": len(rows), "ok": 0, "failed": len(bad), "skipped": n_ok + 1}
    res3 = edit.run(_edit_cfg(data, classifier, editors, out, requests=req, retry_failed="false"))
    assert res3["counts"] == {"in": len(rows), "ok": 0, "failed": 0, "skipped": len(rows)}
    assert len(storage.committed_manifests(out, "edit")) == 3


def test_edit_sweep_on_s3(ray_local, s3_bucket, data, classifier, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    root = f"{s3_bucket}/ds"
    write_latents(root, data["digest"])
    fs.put(data["ckpt"], f"{s3_bucket[5:]}/models/tiny.pt")
    fs.put(classifier["uri"], f"{s3_bucket[5:]}/models/classifier.pt")
    out = f"{s3_bucket}/edited"
    ids = data["ids"]
    sets = {"latents": root, "output": out, "model.checkpoint": f"{s3_bucket}/models/tiny.pt",
            "model.sha256": data["digest"], "classifier": f"{s3_bucket}/models/classifier.pt",
            "metric_weights.allow_random_init": "true", "requests": "null",
            "sweep.image_ids": json.dumps(ids[:2]), "sweep.attributes": "[Young]",
            "sweep.strengths": "[1.0,2.0]", "sweep.targets": "[0,1]"}

    def die(run):
        raise KeyboardInterrupt("killed before publishing")

    with pytest.raises(KeyboardInterrupt):
        edit.run(_cfg(edit, **sets), before_commit=die)
    assert storage.read_committed(out, "edits") is None  # parts written, no manifest: invisible
    res = edit.run(_cfg(edit, **sets))
    assert res["counts"] == {"in": 8, "ok": 8, "failed": 0, "skipped": 0}
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(f"{out[5:]}/edits")] == ["images", f"run={res['run_id']}"]
    t = storage.read_committed(out, "edits")
    assert t.num_rows == 8 and set(t["status"].to_pylist()) == {"ok"}
    for u in t["output_uri"].to_pylist() + t["source_reconstruction_uri"].to_pylist():
        assert u.startswith(f"{out}/edit") and fs.exists(u)
    assert len(fs.ls(f"{out[5:]}/edit_sources")) == 2
    assert len(fs.ls(f"{out[5:]}/_runs")) == 1
    res2 = edit.run(_cfg(edit, **sets))
    assert res2["counts"] == {"in": 8, "ok": 0, "failed": 0, "skipped": 8}


@pytest.mark.parametrize("job,needle", [("fit_classifier", "attributes_list"), ("fit_editor", "sample:"),
                                        ("edit", "sweep:")])
def test_cli_help(job, needle):
    h = subprocess.run([sys.executable, "-m", f"jobs.{job}", "--help"], capture_output=True, text=True, check=True,
                       timeout=120)
    assert needle in h.stdout and "--set" in h.stdout
