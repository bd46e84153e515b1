"""The evaluate job end to end (local Ray, tiny seeded model): metrics equal the inline ones of
invert, a wrong checkpoint gives failed rows, reruns skip, a killed run leaves nothing."""
from __future__ import annotations

import pyarrow.compute as pc
import pytest

from jobs import evaluate, invert
from jobs.cli import load_config
from pipeline import delta
from pipeline.runner import JobRun
from tests.conftest import write_crops

RND = {"metrics": "true", "metric_weights.allow_random_init": "true"}


def _invert(crops, out, ckpt, **over):
    sets = [f"input={crops}", f"output={out}", f"model.checkpoint={ckpt}", "invert.batch_size=4",
            "invert.load_batch_size=4", "progress=false"] + [f"{k}={v}" for k, v in over.items()]
    return invert.run(load_config(invert.SETTINGS, None, sets))


def _ecfg(inp, ckpt, *extra):
    return load_config(evaluate.SETTINGS, None, [f"input={inp}", f"model.checkpoint={ckpt}",
                                                 "metric_weights.allow_random_init=true", "evaluate.batch_size=4",
                                                 "evaluate.load_batch_size=4", "progress=false", *extra])


def _keys(t):
    return list(zip(t["image_id"].to_pylist(), t["face_index"].to_pylist()))


def test_evaluate_matches_inline_metrics_and_refuses_other_model(ray_local, tmp_path, tiny_checkpoint):
    from stmodel.checkpoint import save_inversion
    from tests.conftest import seeded_tiny_model

    ckpt, _ = tiny_checkpoint
    write_crops(tmp_path / "c", 4, seed=8)
    out = str(tmp_path / "ds")
    _invert(tmp_path / "c", out, ckpt, **RND)
    ecfg = _ecfg(out, ckpt)
    r = evaluate.run(ecfg)
    assert r["counts"] == {"in": 4, "ok": 4, "failed": 0, "skipped": 0}
    lat = {(x["image_id"], x["face_index"]): x for x in delta.read_snapshot_arrow(out, "latents").to_pylist()}
    met = delta.read_snapshot_arrow(out, "metrics").to_pylist()
    assert len(met) == 4
    for m in met:
        x = lat[(m["image_id"], m["face_index"])]
        assert abs(m["psnr"] - x["psnr"]) < 1e-3 and abs(m["lpips"] - x["lpips"]) < 1e-4
        assert "RANDOM-INIT" in m["metric_backbones"] and m["latents_run_id"] == x["run_id"]
    assert r["extra"]["metrics"]["psnr"]["n"] == 4
    assert abs(r["extra"]["metrics"]["psnr"]["mean"] - sum(m["psnr"] for m in met) / 4) < 1e-3
    # a different checkpoint than the one that made the codes: failed rows, never wrong numbers
    other = str(tmp_path / "other.pt")
    save_inversion(seeded_tiny_model(seed=1), other)
    r2 = evaluate.run(_ecfg(out, other, f"output={tmp_path / 'ev2'}"))
    assert r2["counts"] == {"in": 4, "ok": 0, "failed": 4, "skipped": 0}
    rows = delta.read_snapshot_arrow(str(tmp_path / "ev2"), "metrics").to_pylist()
    assert {x["status"] for x in rows} == {"model_mismatch"} and "same file" in rows[0]["error"]


def test_rerun_skips_and_killed_run_leaves_metrics_unchanged(ray_local, tmp_path, tiny_checkpoint):
    ckpt, _ = tiny_checkpoint
    crops, out = tmp_path / "c", str(tmp_path / "ds")
    write_crops(crops, 3, seed=9)
    _invert(crops, out, ckpt)
    ecfg = _ecfg(out, ckpt)
    r1 = evaluate.run(ecfg)
    assert r1["counts"] == {"in": 3, "ok": 3, "failed": 0, "skipped": 0}
    version = delta.open_table(out, "metrics").version()
    r2 = evaluate.run(ecfg)  # nothing committed to latents since: nothing read
    assert r2["counts"] == {"in": 0, "ok": 0, "failed": 0, "skipped": 0}
    r2 = evaluate.run(_ecfg(out, ckpt, "full_scan=true"))  # everything read: every face done
    assert r2["counts"] == {"in": 3, "ok": 0, "failed": 0, "skipped": 3}
    assert delta.open_table(out, "metrics").version() == version  # nothing to commit

    # new latents, then a run killed before its commit: the metrics table is unchanged
    write_crops(crops, 2, seed=10)
    _invert(crops, out, ckpt)
    before = delta.read_snapshot_arrow(out, "metrics")

    def die(run: JobRun):
        raise KeyboardInterrupt("killed before publishing")

    with pytest.raises(KeyboardInterrupt):
        evaluate.run(ecfg, before_commit=die)
    assert delta.open_table(out, "metrics").version() == version
    assert delta.read_snapshot_arrow(out, "metrics").equals(before)

    r3 = evaluate.run(ecfg)  # only the latents committed since the last complete run: the 2 new faces
    assert r3["counts"] == {"in": 2, "ok": 2, "failed": 0, "skipped": 0}
    assert r3["extra"]["scan"]["mode"] == "incremental"
    t = delta.read_snapshot_arrow(out, "metrics")
    assert len(_keys(t)) == len(set(_keys(t))) == 5
    assert set(pc.unique(t["status"]).to_pylist()) == {"ok"}
    assert r3["extra"]["metrics"]["psnr"]["n"] == 2  # the summary covers this run's rows only
