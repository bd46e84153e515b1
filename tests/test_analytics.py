"""Analytics over the latents (issue 21): scores, identity embeddings, neighbours and
near-duplicates, as Ray jobs writing Delta tables that engines read without this project."""
from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from jobs import neighbors, score
from jobs.cli import load_config
from jobs.settings.neighbors import DEFAULT_RATIO
from pipeline import delta
from pipeline.config import SettingsError
from pipeline.errors import JobError
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


def test_score_and_quality_settings(tmp_path):
    from jobs import quality
    from pipeline.config import SettingsError, parse
    from pipeline.sections import ScoreSection

    cfg = parse(score.SETTINGS, {"latents": str(tmp_path), "score": {"batch_size": 64, "concurrency": [1, 2]}})
    assert isinstance(cfg.score, ScoreSection) and cfg.score.batch_size == 64 and cfg.score.concurrency == (1, 2)
    assert score.check(cfg) == [] and quality.check(parse(quality.SETTINGS, {"input": str(tmp_path)})) == []
    assert "does not exist" in score.check(parse(score.SETTINGS, {"latents": str(tmp_path / "typo")}))[0]
    assert quality.check(parse(quality.SETTINGS, {})) == ["input: set input=URI"]
    with pytest.raises(SettingsError) as e:
        parse(score.SETTINGS, {"score": {"batch_size": 0, "concurrency": [3, 1]}})
    # a section's rules wait for its values
    assert sorted(m.split(":")[0] for m in e.value.errors) == ["score.batch_size"]
    with pytest.raises(SettingsError, match="rows_per_part: must be >= 1"):
        parse(quality.SETTINGS, {"rows_per_part": 0})


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
    with pytest.raises(JobError, match="no committed classifier"):
        score.run(_cfg(score.SETTINGS, latents=root, classifier_run="no-such-run"))
    failed = delta.read_snapshot_arrow(root, "scores", filter_expr=pc.field("status") != "ok")
    assert failed.num_rows == 0


# ---------------------------------------------------------------------------- neighbours

def _pair_scores(groups, truth: set) -> tuple[float, float]:
    """Recall and precision of the pairs that share a group, against the planted pairs."""
    by_group: dict = {}
    for r in groups.to_pylist():
        by_group.setdefault(r["group_id"], []).append(r["image_id"])
    pred = {frozenset((a, b)) for g in by_group.values() for i, a in enumerate(g) for b in g[i + 1:]}
    tp = len(pred & truth)
    return tp / max(len(truth), 1), tp / max(len(pred), 1)


@pytest.fixture(scope="module")
def planted(ray_local, tmp_path_factory):
    """A plain folder of distinct photos and planted near copies, inverted by the seeded tiny-32
    model and embedded by the seeded random FaceNet, as the jobs do it."""
    from jobs import embed, invert
    from tests.analytics_data import planted_corpus

    base = tmp_path_factory.mktemp("planted")
    folder, root = str(base / "photos"), str(base / "ds")
    pairs = planted_corpus(folder, 60, 20)
    res = invert.run(_cfg(invert.SETTINGS, input=folder, output=root, **{"model.preset": "tiny-32",
                                                                          "invert.batch_size": 16}))
    assert res["counts"]["ok"] == 80
    e = embed.run(_cfg(embed.SETTINGS, input=root, **{"metric_weights.allow_random_init": "true"}))
    assert e["counts"] == {"in": 80, "ok": 80, "failed": 0, "skipped": 0}
    lat = delta.read_snapshot_arrow(root, "latents", columns=["image_id", "source_uri"])
    by_uri = dict(zip(lat["source_uri"].to_pylist(), lat["image_id"].to_pylist()))
    truth = {frozenset((by_uri[a], by_uri[b])) for a, b in pairs}
    return {"root": root, "truth": truth}


def _brute(v: np.ndarray, metric: str, k: int):
    from pipeline.vector_index import prepare

    v = prepare(v, metric).astype(np.float64)
    d = 1 - v @ v.T if metric == "cosine" else np.sqrt(((v[:, None] - v[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return d, order


def _ratio_groups(nb, ids: list, ratio: float, rank: int) -> tuple[dict, dict]:
    """The ratio rule as jobs.neighbors states it, in plain Python over its neighbour rows: each
    face's components and resolved threshold."""
    rows = nb.to_pylist()
    ref = {}
    for r in rows:  # the distance at rank `rank` (or the face's last, with fewer faces)
        if r["rank"] <= rank and r["rank"] >= ref.get(r["image_id"], (0, 0))[0]:
            ref[r["image_id"]] = (r["rank"], r["distance"])
    limit = {i: ratio * ref[i][1] for i in ids}
    close = {frozenset((r["image_id"], r["neighbor_image_id"])) for r in rows if r["rank"] < rank
             and r["distance"] < limit[r["image_id"]] and r["distance"] < limit[r["neighbor_image_id"]]}
    comp = {i: {i} for i in ids}
    for a, b in close:
        merged = comp[a] | comp[b]
        for x in merged:
            comp[x] = merged
    return comp, limit


@pytest.mark.parametrize("space, threshold", [("crop", None), ("wplus", "0.02"), ("identity", None)])
def test_neighbors_job(planted, space, threshold, tmp_path):
    from jobs import neighbors
    from pipeline.fit_data import codes_to_numpy
    from pipeline.neighbors_stage import RATIO_RANK, _crop_vectors
    from pipeline.schemas import nested_list_to_numpy

    root = planted["root"]
    out = str(tmp_path / "nb")
    sets = {"space": space, "k": 5, **({"threshold": threshold} if threshold else {})}
    res = neighbors.run(_cfg(neighbors.SETTINGS, input=root, output=out, **sets))
    assert res["counts"] == {"in": 80, "ok": 80, "failed": 0, "skipped": 0}
    assert res["extra"]["index"] == "flat"
    nb = delta.read_snapshot_arrow(out, "neighbors")
    assert nb.num_rows == 80 * 5 and set(nb["rank"].to_pylist()) == {1, 2, 3, 4, 5}
    # the same neighbours as a brute-force search over the same vectors
    if space == "wplus":
        t = delta.read_snapshot_arrow(root, "latents", columns=["image_id", "w_plus"])
        v, metric = codes_to_numpy(t["w_plus"]).mean(1), "l2"
    elif space == "crop":
        t = delta.read_snapshot_arrow(root, "latents", columns=["image_id", "aligned_uri"])
        v, ok = _crop_vectors(t["aligned_uri"].to_pylist())
        assert ok.all() and v.shape == (80, 192) and 0 <= v.min() and v.max() <= 1 / np.sqrt(192) + 1e-6
        metric = "l2"
    else:
        t = delta.read_snapshot_arrow(root, "embeddings", columns=["image_id", "embedding"])
        v, metric = nested_list_to_numpy(t["embedding"]), "cosine"
    ids = t["image_id"].to_pylist()
    d, order = _brute(v, metric, 5)
    pos = {i: j for j, i in enumerate(ids)}
    for r in nb.to_pylist():
        i, j = pos[r["image_id"]], pos[r["neighbor_image_id"]]
        assert r["distance"] == pytest.approx(d[i, j], abs=1e-4)
        assert r["distance"] == pytest.approx(d[i, order[i, r["rank"] - 1]], abs=1e-4)
    # groups: connected components of the near-duplicate pairs, as plain Python finds them
    g = delta.read_snapshot_arrow(out, "duplicate_groups")
    got = {r["image_id"]: r for r in g.to_pylist()}
    hist = delta.commit_history(out, "neighbors")
    assert g.num_rows == 80 and hist[-1]["space"] == space
    if threshold is None:  # the ratio rule: each face's own threshold, their median in the commit
        assert res["extra"]["ratio"] == DEFAULT_RATIO and hist[-1]["rule"] == "ratio"
        comp, limit = _ratio_groups(nb, ids, DEFAULT_RATIO, RATIO_RANK)
        for i in ids:
            assert got[i]["threshold"] == pytest.approx(limit[i], rel=1e-5)
        th = float(np.median(list(limit.values())))
        assert float(hist[-1]["threshold"]) == pytest.approx(th, rel=1e-5) and float(hist[-1]["ratio"]) == 0.45
    else:
        th = res["extra"]["threshold"]
        assert np.allclose(g["threshold"].to_numpy(), th) and float(hist[-1]["threshold"]) == th
        assert hist[-1]["rule"] == "threshold"
        close = {frozenset((r["image_id"], r["neighbor_image_id"])) for r in nb.to_pylist() if r["distance"] < th}
        comp = {i: {i} for i in ids}
        for a, b in close:
            merged = comp[a] | comp[b]
            for x in merged:
                comp[x] = merged
    for i in ids:
        assert got[i]["group_size"] == len(comp[i])
        assert got[i]["representative_image_id"] == min(comp[i])
    recall, precision = _pair_scores(g, planted["truth"])
    print(f"\n{space}: threshold {th:.4g}: planted pairs recall {recall:.3f}, precision {precision:.3f}, "
          f"{res['extra']['duplicate_groups']} groups")
    if space == "crop":  # the defaults, as measured (README, Analytics)
        assert recall >= 0.95 and precision >= 0.95
    # the same source version and settings: nothing to do
    again = neighbors.run(_cfg(neighbors.SETTINGS, input=root, output=out, **sets))
    assert again["counts"] == {"in": 80, "ok": 0, "failed": 0, "skipped": 80}
    assert len(delta.commit_history(out, "neighbors")) == len(hist)
    if space == "identity":  # a ratio outside (0, 1) never reaches the job
        with pytest.raises(SettingsError, match="ratio: must be > 0, < 1"):
            _cfg(neighbors.SETTINGS, input=root, output=out, space=space, ratio=1.5)


def test_neighbors_settings_rules():
    """layers only with wplus and as [a, b) with a < b; the ratio rule needs k >= 3."""
    from pipeline.config import parse

    with pytest.raises(SettingsError) as e:
        parse(neighbors.Settings, {"space": "crop", "layers": [4, 2], "k": 2})
    assert sorted(e.value.errors) == sorted([
        "layers: must be [a, b) with a < b, got [4, 2]", "layers: only the wplus space averages layers (space is crop)",
        "k: the ratio rule (threshold null) compares with the 3rd neighbour: needs k >= 3, got 2"])
    assert parse(neighbors.Settings, {"space": "wplus", "layers": [0, 4], "k": 2, "threshold": 0.1}).layers == (0, 4)


def test_neighbors_no_duplicates(planted, tmp_path):
    """The distinct photos alone (the planted corpus without its copies): the default rule groups
    none of them, although every face has nearest neighbours."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from jobs import neighbors

    lat = delta.read_snapshot_arrow(planted["root"], "latents", columns=["image_id", "face_index", "status",
                                                                         "aligned_uri", "source_uri"])
    distinct = lat.filter(pc.invert(pc.match_substring(lat["source_uri"], "/copy_")))
    assert distinct.num_rows == 60
    root = str(tmp_path / "distinct")
    write_deltalake(f"{root}/latents", distinct.select(["image_id", "face_index", "status", "aligned_uri"])
                    .cast(pa.schema([("image_id", pa.string()), ("face_index", pa.int32()), ("status", pa.string()),
                                      ("aligned_uri", pa.string())])))
    res = neighbors.run(_cfg(neighbors.SETTINGS, input=root))
    assert res["counts"]["ok"] == 60
    g = delta.read_snapshot_arrow(root, "duplicate_groups")
    assert g.num_rows == 60
    print(f"\nno duplicates: {res['extra']['duplicate_groups']} groups, "
          f"median threshold {res['extra']['threshold']:.4f}")
    assert set(g["group_size"].to_pylist()) == {1} and res["extra"]["duplicate_groups"] == 0


def test_neighbors_ivf_matches_exact(planted, tmp_path):
    from jobs import neighbors

    out = str(tmp_path / "ivf")
    exact = neighbors.run(_cfg(neighbors.SETTINGS, input=planted["root"], output=out, k=5, space="wplus",
                               threshold=0.02))
    res = neighbors.run(_cfg(neighbors.SETTINGS, input=planted["root"], output=out, k=5, space="wplus",
                             layers="[0,8]", **{"index.kind": "ivf", "index.nlist": 4, "index.nprobe": 4}))
    assert exact["extra"]["space"] == "wplus" and res["extra"]["space"] == "wplus[0:8]"
    assert res["extra"]["index"] == "ivf"
    nb = delta.read_snapshot_arrow(out, "neighbors")
    assert nb.num_rows == 2 * 80 * 5   # one set of rows per space
    # all lists probed: IVF returns the exact neighbours (layers [0, 8) is every layer of tiny-32)
    key = lambda t: sorted((r["image_id"], r["rank"], r["neighbor_image_id"]) for r in t.to_pylist())  # noqa: E731
    assert key(nb.filter(pc.field("space") == "wplus")) == key(nb.filter(pc.field("space") == "wplus[0:8]"))


# ---------------------------------------------------------------------------- quality

def _ledoit_wolf_in_memory(x: np.ndarray) -> np.ndarray:
    """scikit-learn's ledoit_wolf on the whole (centred) matrix at once: the shrunk covariance."""
    n, p = x.shape
    x = x - x.mean(0)
    emp = x.T @ x / n
    mu = np.trace(emp) / p
    x2 = x ** 2
    beta = (np.sum(x2.T @ x2) / n - np.sum(emp ** 2)) / (p * n)
    delta = np.sum((emp - mu * np.eye(p)) ** 2) / p
    s = min(beta, delta) / delta
    return (1 - s) * emp + s * mu * np.eye(p)


def test_quality_job(ray_local, tmp_path):
    from jobs import quality
    from pipeline.runner import JobRun, TableSpec
    from pipeline.schemas import latents_schema, make_table
    from tests.editing_data import NL, D, codes, iid

    root = str(tmp_path / "ds")
    n = 300
    w = codes(n, 7) * np.linspace(0.2, 3.0, D, dtype=np.float32)  # anisotropic: a shrinkage inside (0, 1)
    w[:3] *= 4.0                                        # atypical codes
    rng = np.random.default_rng(1)
    psnr = rng.normal(25, 1.0, n).astype(np.float32)
    psnr[10:12] = 15.0                                  # badly inverted
    lpips = rng.normal(0.2, 0.02, n).astype(np.float32)
    lpips[20] = 0.6
    spec = TableSpec("latents", latents_schema(NL, D), ("image_id", "face_index"))
    cols = {"image_id": [iid(i) for i in range(n + 1)], "face_index": [0] * (n + 1),
            "status": ["ok"] * n + ["decode_error"], "psnr": list(psnr) + [None], "lpips": list(lpips) + [None]}
    wall = np.concatenate([w, np.zeros((1, NL, D), np.float32)])
    r = JobRun(root, "invert")
    r.commit({spec: r.write_small(spec, make_table(cols, spec.schema, r.run_id, w_plus=wall,
                                                    ok=np.arange(n + 1) < n))}, {"in": n + 1})
    res = quality.run(_cfg(quality.SETTINGS, input=root))
    assert res["counts"] == {"in": n, "ok": n, "failed": 0, "skipped": 0}
    t = delta.read_snapshot_arrow(root, "quality")
    assert t.num_rows == n
    got = {r["image_id"]: r for r in t.to_pylist()}
    # the Mahalanobis distances of an in-memory Ledoit-Wolf estimate
    x = w.astype(np.float64).mean(1)
    cov = _ledoit_wolf_in_memory(x)
    xc = x - x.mean(0)
    want = np.sqrt(np.einsum("ij,jk,ik->i", xc, np.linalg.inv(cov), xc))
    np.testing.assert_allclose([got[iid(i)]["mahalanobis"] for i in range(n)], want, rtol=1e-4)
    assert 0 < res["extra"]["shrinkage"] < 1
    top = sorted(got.values(), key=lambda r: -r["mahalanobis"])[:3]
    assert {r["image_id"] for r in top} == {iid(i) for i in range(3)}
    worst = sorted(got.values(), key=lambda r: -r["psnr_z"])[:2]
    assert {r["image_id"] for r in worst} == {iid(10), iid(11)} and worst[0]["psnr_z"] > 5
    assert max(got.values(), key=lambda r: r["lpips_z"])["image_id"] == iid(20)
    z = np.array([got[iid(i)]["psnr_z"] for i in range(n)])
    assert abs(z.mean()) < 1e-3 and abs(z.std() - 1) < 1e-3
    again = quality.run(_cfg(quality.SETTINGS, input=root))
    assert again["counts"] == {"in": n, "ok": 0, "failed": 0, "skipped": n}


# ---------------------------------------------------------------------------- directions

def test_fit_directions_and_edit_by_name(ray_local, scored_data, tiny_checkpoint, tmp_path):
    import pandas as pd

    from jobs import edit, fit_directions
    from stmodel.label_edit import load_direction
    from tests.editing_data import U

    root = scored_data["root"]
    labels = str(tmp_path / "labels.csv")
    pd.DataFrame({"image_id": scored_data["ids"], **{a: scored_data["labels"][:, j] for j, a in enumerate(SCORE_ATTRS)}}
                 ).to_csv(labels, index=False)
    dirs = str(tmp_path / "dirs")
    res = fit_directions.run(_cfg(fit_directions.SETTINGS, latents=root, output=dirs, components=5, attributes=labels))
    n = len(scored_data["ids"])
    assert res["counts"] == {"in": n + 2, "ok": n, "failed": 0, "skipped": 2}
    assert res["extra"]["directions"][:5] == [f"pca_{i}" for i in range(5)]
    assert sorted(res["extra"]["directions"][5:]) == sorted(SCORE_ATTRS)
    ratio = res["extra"]["explained_variance_ratio"]
    assert ratio == sorted(ratio, reverse=True) and 0 < sum(ratio) < 1
    x = scored_data["w"].astype(np.float64).mean(1)
    xc = x - x.mean(0)
    vals, vecs = np.linalg.eigh(xc.T @ xc / n)
    from pipeline import model_registry

    rows = {m["attribute"]: m for m in model_registry.committed_models(dirs, "direction")}
    pca0 = load_direction(rows["pca_0"]["uri"], rows["pca_0"]["sha256"]).numpy()
    assert pca0.shape == (x.shape[1],)
    # the top principal axis, one standard deviation long
    assert abs(pca0 @ vecs[:, -1]) / np.linalg.norm(pca0) > 0.999
    assert np.linalg.norm(pca0) == pytest.approx(np.sqrt(vals[-1]), rel=1e-3)
    # the boundary of each attribute follows the rule that made its labels (sign of the mean code on u)
    for j, a in enumerate(SCORE_ATTRS):
        d = load_direction(rows[a]["uri"]).numpy()
        u = U[j].reshape(-1, x.shape[1])[0]
        assert d @ u / (np.linalg.norm(d) * np.linalg.norm(u)) > 0.8, a

    ids = scored_data["ids"][:16]
    common = {"latents": root, "model.checkpoint": tiny_checkpoint[0], "classifier": root,
              "classifier_run": scored_data["classifier"]["run_id"], "directions": dirs, "metrics": "false",
              "sweep.image_ids": "[" + ",".join(ids) + "]", "edit.batch_size": 16}
    up = edit.run(_cfg(edit.SETTINGS, output=str(tmp_path / "e1"), direction="Smiling", **{"sweep.strengths": "[2.0]"},
                       **common))
    assert up["counts"] == {"in": 16, "ok": 16, "failed": 0, "skipped": 0}
    t = delta.read_snapshot_arrow(str(tmp_path / "e1"), "edits")
    assert set(t["kind"].to_pylist()) == {"direction"} and set(t["attribute"].to_pylist()) == {"Smiling"}
    assert set(t["direction_uri"].to_pylist()) == {rows["Smiling"]["uri"]}
    raised = np.mean(np.array(t["logit_after"].to_pylist()) > np.array(t["logit_before"].to_pylist()))
    print(f"\nSmiling direction, strength 2 std: the classifier's Smiling logit rose for {raised:.2f} of 16 faces")
    assert raised == 1.0
    # against the direction, it falls
    down = edit.run(_cfg(edit.SETTINGS, output=str(tmp_path / "e2"), direction="Smiling",
                         **{"sweep.strengths": "[-2.0]"}, **common))
    t2 = delta.read_snapshot_arrow(str(tmp_path / "e2"), "edits")
    assert down["counts"]["ok"] == 16 and np.all(np.array(t2["logit_after"].to_pylist())
                                                 < np.array(t2["logit_before"].to_pylist()))
    pca = edit.run(_cfg(edit.SETTINGS, output=str(tmp_path / "e3"), direction="pca_0", **common))
    assert pca["counts"] == {"in": 16, "ok": 16, "failed": 0, "skipped": 0}
    from pipeline.errors import JobError

    with pytest.raises(JobError, match="no committed direction 'Bald'"):
        edit.run(_cfg(edit.SETTINGS, output=str(tmp_path / "e4"), direction="Bald", **common))


# ---------------------------------------------------------------------------- scale

@pytest.mark.slow
def test_score_driver_allocations_do_not_grow_with_faces(ray_local, tmp_path):
    """The driver of jobs.score holds no rows: its allocations grow by less than the scale
    test's bound per face between 64 and 2,048 faces (tests/test_scale.py)."""
    from tests.test_scale import BOUND, DriverAllocations

    growth = {}
    for n in (32, 64, 2048):
        root = str(tmp_path / f"ds{n}")
        lat = write_latents(root, "0" * 64, n=n)
        commit_model(root, "classifier", _classifier(lat["w"], rule(lat["w"]), steps=5), "classifier.pt")
        with DriverAllocations() as m:
            res = score.run(_cfg(score.SETTINGS, latents=root, **{"score.batch_size": 256}))
        assert res["counts"]["ok"] == n
        growth[n] = m.growth
    per_face = (growth[2048] - growth[64]) / (2048 - 64)
    print(f"\nscore: driver growth {growth}, {per_face:.0f} B per face")
    assert per_face < BOUND, f"driver grew {per_face:.0f} bytes per face"


# ---------------------------------------------------------------------------- README

@pytest.fixture(scope="module")
def analysed(planted, tmp_path_factory):
    """The planted corpus with every analytics table: a classifier committed beside its codes,
    then score, neighbors (defaults) and quality, as a user runs them."""
    import shutil

    from jobs import neighbors, quality
    from pipeline.fit_data import codes_to_numpy

    ds = str(tmp_path_factory.mktemp("analysed") / "ds")
    shutil.copytree(planted["root"], ds)
    lat = delta.read_snapshot_arrow(ds, "latents", columns=["w_plus"])
    w = codes_to_numpy(lat["w_plus"])
    commit_model(ds, "classifier", _classifier(w, rule(w)), "classifier.pt")
    assert score.run(_cfg(score.SETTINGS, latents=ds))["counts"]["ok"] == 80
    assert neighbors.run(_cfg(neighbors.SETTINGS, input=ds))["counts"]["ok"] == 80
    assert quality.run(_cfg(quality.SETTINGS, input=ds))["counts"]["ok"] == 80
    return ds


def test_readme_analytics_queries(analysed):
    """The README's analytics queries (DuckDB, polars) run against a demo-sized dataset made by
    the jobs: the planted corpus inverted, embedded, scored, searched and checked for quality."""
    import re
    from pathlib import Path

    ds = analysed
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"<!-- analytics-queries -->\n```python\n(.*?)```", readme, re.S)
    assert block, "the README's analytics query block is missing"
    scope: dict = {}
    exec(block.group(1).replace('ds = "ds"', f"ds = {ds!r}"), scope)  # noqa: S102 - the README's own code
    s = delta.read_snapshot_arrow(ds, "scores")
    want = int(np.sum((s["Smiling"].to_numpy() > 0.5) & (s["Eyeglasses"].to_numpy() > 0.5)))
    assert scope["both"] == want == scope["both_polars"]
    g = delta.read_snapshot_arrow(ds, "duplicate_groups")
    assert len(scope["groups_found"]) == len({r["group_id"] for r in g.to_pylist() if r["group_size"] > 1}) > 0
    assert len(scope["nearest"]) == 10 and scope["nearest"] == sorted(scope["nearest"], key=lambda r: r[1])
    q = delta.read_snapshot_arrow(ds, "quality")
    assert scope["atypical"][0][1] == pytest.approx(float(np.max(q["mahalanobis"].to_numpy())))


@pytest.mark.parametrize("job,needles", [("score", ["classifier_run", "Smiling > 0.5"]), ("embed", ["crop_size"]),
                                         ("neighbors", ["space = crop", "ratio = 0.45", "ratio 0.45",
                                                        "index.exact_below"]),
                                         ("quality", ["mahalanobis"]), ("fit_directions", ["components", "pca_0"])])
def test_cli_help(job, needles):
    import subprocess
    import sys

    h = subprocess.run([sys.executable, "-m", f"jobs.{job}", "--help"], capture_output=True, text=True, check=True,
                       timeout=120)
    for needle in [*needles, "--set"]:
        assert needle in h.stdout, needle


def test_report_analytics_section(analysed, tmp_path):
    """The report's analytics section: prevalence, duplicate strips, outliers, neighbour strips and
    the sweeps of a published PCA direction rendered by jobs.edit."""
    import re

    from jobs import edit, fit_directions, report

    out = str(tmp_path / "edited")
    d = fit_directions.run(_cfg(fit_directions.SETTINGS, latents=analysed, output=out, components=2))
    assert d["extra"]["directions"] == ["pca_0", "pca_1"]
    ids = delta.read_snapshot_arrow(analysed, "latents", columns=["image_id"])["image_id"].to_pylist()[:2]
    e = edit.run(_cfg(edit.SETTINGS, latents=analysed, output=out, **{"model.preset": "tiny-32"}, directions=out,
                      direction="pca_0", metrics="false", **{"sweep.image_ids": "[" + ",".join(ids) + "]",
                                                             "sweep.strengths": "[-2.0,2.0]"}))
    assert e["counts"] == {"in": 4, "ok": 4, "failed": 0, "skipped": 0}
    # the report of the analysed root, with the edits (and their directions) of `out` beside it
    import shutil

    for t in ("edits", "models"):
        shutil.copytree(f"{out}/{t}", f"{analysed}/{t}", dirs_exist_ok=True)
    res = report.run(_cfg(report.SETTINGS, input=analysed, output=str(tmp_path / "rep")))
    assert res["counts"]["failed"] == 0
    html = open(res["extra"]["report"]).read()
    section = html[html.index("Analytics (jobs.score"):]
    for needle in ("Attribute prevalence", "Smiling", "Near-duplicate groups", "Atypical codes",
                   "Nearest neighbours", "Direction sweeps", "pca_0", "+2 std", "-2 std"):
        assert needle in section, needle
    g = delta.read_snapshot_arrow(analysed, "duplicate_groups")
    n_groups = len({r["group_id"] for r in g.to_pylist() if r["group_size"] > 1})
    assert f"{n_groups} groups" in section
    assert len(re.findall(r"data:image/png;base64", section)) >= 2 * n_groups + 10
