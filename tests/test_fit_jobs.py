"""The fit jobs end to end (Ray Train): fit_classifier and fit_editor read the committed Delta
`latents` snapshot, write their models under run-scoped keys and publish them with `models`
rows in the run's commit; a run that fails before its commit publishes nothing."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from jobs import edit, fit_classifier, fit_editor
from jobs.cli import load_config
from pipeline import delta, model_registry, storage
from pipeline.config import SettingsError
from pipeline.errors import JobError
from pipeline.fit_loops import auc_score
from tests.editing_data import ATTRS, N_IMG, NL, NO_LABELS, D, iid, rule, write_latents


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_checkpoint):
    ckpt, digest = tiny_checkpoint
    base = tmp_path_factory.mktemp("fitjobs")
    root = str(base / "ds")
    lat = write_latents(root, digest)
    labels = rule(lat["w"])
    rows = []
    for i in range(N_IMG - NO_LABELS):
        rows.append({"image_id": lat["ids"][i], **{a: int(2 * labels[i, k] - 1) for k, a in enumerate(ATTRS)}})
    rows[5]["Male"] = 7  # not a label: that row fails with a clear reason
    for j in range(3):   # labels of images that were never inverted
        rows.append({"image_id": iid(10_000 + j), **{a: 1 for a in ATTRS}})
    import pandas as pd

    csv = str(base / "attributes.csv")
    pd.DataFrame(rows).to_csv(csv, index=False)
    return {"root": root, "attributes": csv, "ckpt": ckpt, "digest": digest, "base": base, **lat, "labels": labels}


def _cfg(job, **sets):
    return load_config(job.SETTINGS, None, [f"{k}={v}" for k, v in {"progress": "false", **sets}.items()])


def _clf_cfg(data, **sets):
    return _cfg(fit_classifier, latents=data["root"], attributes=data["attributes"], output=data["root"],
                val_fraction=0.2, **{"classifier.hidden": "[256,64]", "fit_classifier.epochs": 10,
                                     "fit_classifier.batch_size": 64, "fit_classifier.lr": 1e-3,
                                     "fit_classifier.ray_storage": str(data["base"] / "ray_results"), **sets})


@pytest.fixture(scope="module")
def classifier(ray_local, data):
    res = fit_classifier.run(_clf_cfg(data))
    return {"res": res, "uri": res["extra"]["classifier"], "run_id": res["run_id"]}


def test_auc_rank_formula():
    assert auc_score(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auc_score(np.array([1.0, 1.0, 1.0]), np.array([0, 1, 1])) == 0.5  # ties: average ranks
    assert np.isnan(auc_score(np.array([0.2, 0.3]), np.array([1, 1])))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_the_pairwise_definition(seed):
    """AUC = P(score of a positive > score of a negative) + P(equal) / 2, over every pair; scores
    rounded so that many are tied."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.standard_normal(300) + y, 1)
    pos, neg = s[y == 1][:, None], s[y == 0][None, :]
    reference = float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))
    assert auc_score(s, y) == pytest.approx(reference, abs=1e-12)


def _errors(job, sets: list[str]) -> list[str]:
    with pytest.raises(SettingsError) as e:
        load_config(job.SETTINGS, None, sets)
    return e.value.errors


def test_fit_settings_ranges_and_rules():
    """No Ray: values out of range and sampling without a model stop before anything runs."""
    errs = _errors(fit_classifier, ["val_fraction=0", "classifier.hidden=[256,0]", "fit_classifier.epochs=-1"])
    assert len(errs) == 3 and errs[0].startswith("val_fraction: must be > 0, < 1")
    assert any(e.startswith("classifier.hidden: must be >= 1") for e in errs)
    errs = _errors(fit_editor, ["editor.dropout=1", "fit_editor.batch_size=1", "loss.ref=-1", "sample.n=1"])
    assert sorted(e.split(":")[0] for e in errs) == ["editor.dropout", "fit_editor.batch_size", "loss.ref", "sample.n"]
    assert _errors(fit_editor, ["sample.n=100"]) == [
        "model.checkpoint: sampling codes (sample.n, without latents) needs the inversion model: set "
        "model.checkpoint=URI"]
    assert load_config(fit_editor.SETTINGS, None, ["sample.n=100", "latents=/x"]).sample.n == 100  # unused
    assert load_config(fit_editor.SETTINGS, None, ["attributes=Smiling"]).attribute_names() == ["Smiling"]


def test_fit_checks_before_ray(tmp_path):
    """The preflight of each fit job: missing inputs and settings that name nothing to do."""
    cfg = load_config(fit_editor.SETTINGS, None, [])
    assert [e.split(":")[0] for e in fit_editor.check(cfg)] == ["classifier", "output", "attributes", "latents"]
    assert fit_editor.check(load_config(fit_editor.SETTINGS, None, [
        "classifier=c", "output=o", "attributes=[Smiling]", "sample.n=2", "model.preset=tiny-32"])) == []
    errs = fit_classifier.check(load_config(fit_classifier.SETTINGS, None, [f"latents={tmp_path}/none"]))
    assert [e.split(":")[0] for e in errs] == ["latents", "attributes", "output"] and "does not exist" in errs[0]


def test_fit_classifier(classifier, data):
    res = classifier["res"]
    c = res["counts"]
    assert c == {"in": N_IMG + 2, "ok": N_IMG - NO_LABELS - 1, "failed": NO_LABELS + 1, "skipped": 2}
    assert c["in"] == c["ok"] + c["failed"] + c["skipped"]
    ex = res["extra"]
    assert ex["errors"] == {"no labels": NO_LABELS, "invalid label value (not 0/1/-1/bool) in Male": 1}
    assert ex["labels_without_latents"] == 3
    assert ex["attributes"] == ["Male", "Smiling", "Young"]  # CelebA's order
    ev = delta.read_snapshot_arrow(data["root"], "classifier_eval").to_pylist()
    assert sorted(r["attribute"] for r in ev) == sorted(ex["attributes"])
    for r in ev:
        print(f"\nclassifier {r['attribute']}: held-out accuracy {r['accuracy']:.3f}, AUC {r['auc']:.3f}, "
              f"n_val {r['n_val']}, positive rate {r['positive_rate']:.2f}")
        assert r["accuracy"] >= 0.85 and r["auc"] >= 0.9  # chance: 0.5
        assert r["n_val"] + r["n_train"] == c["ok"] and 0.12 < r["n_val"] / c["ok"] < 0.28
        assert r["run_id"] == classifier["run_id"] and r["classifier_sha256"] == ex["classifier_sha256"]
    # the file is run-scoped and published by the run's `models` row
    assert classifier["uri"] == os.path.join(data["root"], "model_files", "classifier", classifier["run_id"],
                                             "classifier.pt")
    m = model_registry.resolve(data["root"], "classifier")
    assert (m["uri"], m["sha256"], m["run_id"]) == (classifier["uri"], ex["classifier_sha256"], classifier["run_id"])
    from stmodel.classifier import load_classifier

    clf = load_classifier(m["uri"], sha256=m["sha256"])
    assert clf.attributes == ex["attributes"] and (clf.n_latent, clf.style_dim) == (NL, D)


def test_failed_fit_run_publishes_no_model(classifier, data):
    """A fit run that dies after writing its model file but before its commit: the `models` and
    `classifier_eval` tables are unchanged and edit resolves the committed classifier."""
    before = {t: delta.read_snapshot_arrow(data["root"], t).to_pylist() for t in ("models", "classifier_eval")}
    failed = {}

    def die(run):
        failed["run_id"] = run.run_id
        raise KeyboardInterrupt("killed before publishing")

    with pytest.raises(KeyboardInterrupt):
        fit_classifier.run(_clf_cfg(data, **{"fit_classifier.epochs": 1}), before_commit=die)
    orphan = os.path.join(data["root"], "model_files", "classifier", failed["run_id"], "classifier.pt")
    assert os.path.exists(orphan)  # written, never published
    after = {t: delta.read_snapshot_arrow(data["root"], t).to_pylist() for t in ("models", "classifier_eval")}
    assert after == before
    with pytest.raises(LookupError, match="no committed classifier"):
        model_registry.resolve(data["root"], "classifier", run_id=failed["run_id"])
    clf, _ = edit.resolve_models(_cfg(edit, latents=data["root"], output="unused", classifier=data["root"]))
    assert (clf["run_id"], clf["uri"]) == (classifier["run_id"], classifier["uri"])
    with pytest.raises(JobError, match="no committed classifier"):
        edit.resolve_models(_cfg(edit, latents=data["root"], output="unused", classifier=data["root"],
                                 classifier_run=failed["run_id"]))
    with pytest.raises(JobError, match="give its sha256"):  # a file is accepted only with its hash
        edit.resolve_models(_cfg(edit, latents=data["root"], output="unused", classifier=orphan))


@pytest.fixture(scope="module")
def editors(classifier, data):
    res = fit_editor.run(_cfg(
        fit_editor, classifier=data["root"], output=data["root"], attributes="[Smiling]", latents=data["root"],
        val_fraction=0.25, **{"editor.ff_dim": 128, "fit_editor.steps": 150, "fit_editor.batch_size": 64,
                              "fit_editor.lr": 1e-3, "fit_editor.ray_storage": str(data["base"] / "ray_results")}))
    return {"res": res}


def test_fit_editor_learns(editors, classifier, data):
    res = editors["res"]
    assert res["counts"] == {"in": N_IMG + 2, "ok": N_IMG, "failed": 0, "skipped": 2}
    assert res["extra"]["classifier"]["run_id"] == classifier["run_id"]  # the newest committed one
    e = res["extra"]["editors"]["Smiling"]
    print(f"\neditor Smiling (held-out pairs): target-embedding distance to the reference "
          f"{e['ref_before']:.4f} -> {e['ref_after']:.4f} (unchanged source: {e['identity_ref']:.4f}); "
          f"loss {e['loss_before']:.4f} -> {e['loss_after']:.4f}; l2 {e['l2_after']:.4f}")
    assert e["ref_after"] < 0.75 * e["ref_before"]
    assert e["ref_after"] < 0.75 * e["identity_ref"]
    assert e["loss_after"] < e["loss_before"]
    assert e["uri"] == os.path.join(data["root"], "model_files", "editor", res["run_id"], "editor_Smiling.pt")
    m = model_registry.resolve(data["root"], "editor", "Smiling")
    assert (m["uri"], m["sha256"], m["run_id"]) == (e["uri"], e["sha256"], res["run_id"])
    from stmodel.editor import load_editor

    editor, clf, opts = load_editor(m["uri"], sha256=m["sha256"])
    assert opts["attribute"] == "Smiling" and clf is not None and editor.style_dim == D
    # what edit resolves from the root: this run's editor and the committed classifier
    clf_row, eds = edit.resolve_models(_cfg(edit, latents=data["root"], output="unused", classifier=data["root"],
                                            editors=data["root"]))
    assert clf_row["run_id"] == classifier["run_id"] and set(eds) == {"Smiling"}
    assert eds["Smiling"]["run_id"] == res["run_id"]


def test_fit_editor_sampled_codes(classifier, data):
    """Codes drawn through the inversion model's mapping net instead of a latents table; the
    classifier given as a file with its sha256."""
    out = str(data["base"] / "editors_sampled")
    res = fit_editor.run(_cfg(
        fit_editor, classifier=classifier["uri"], classifier_sha256=classifier["res"]["extra"]["classifier_sha256"],
        output=out, attributes="[Young]",
        **{"model.checkpoint": data["ckpt"], "sample.n": 128, "sample.n_val": 32, "sample.mean_n": 256,
           "editor.ff_dim": 64, "fit_editor.steps": 4, "fit_editor.batch_size": 32,
           "fit_editor.ray_storage": str(data["base"] / "ray_results")}))
    assert res["counts"] == {"in": 160, "ok": 160, "failed": 0, "skipped": 0}
    e = res["extra"]["editors"]["Young"]
    assert e["steps"] == 4 and e["pairs"] == 16 and os.path.exists(e["uri"])
    assert res["extra"]["source"]["truncation"] == 0.7
    assert model_registry.resolve(out, "editor", "Young")["sha256"] == e["sha256"]
    assert len(storage.list_files(storage.join(out, "_runs"))) == 1


@pytest.mark.parametrize("job,needle", [("fit_classifier", "attributes_list"), ("fit_editor", "sample:")])
def test_cli_help(job, needle):
    h = subprocess.run([sys.executable, "-m", f"jobs.{job}", "--help"], capture_output=True, text=True, check=True,
                       timeout=120)
    assert needle in h.stdout and "--set" in h.stdout
