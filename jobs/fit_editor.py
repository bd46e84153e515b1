"""Fit job: reference-based edit transformers, one per attribute, against a frozen latent
classifier (the official objective), on Ray Train.

    python -m jobs.fit_editor --set classifier=ROOT --set output=URI --set attributes=[Smiling,Male] \\
        --set latents=URI
    python -m jobs.fit_editor --set classifier=ROOT --set output=URI --set attributes=[Smiling] \\
        --set model.checkpoint=URI --set sample.n=20000 [--set sample.truncation=0.7]

`classifier` is a dataset root with a committed `models` table (jobs.fit_classifier): its
newest committed classifier, or the one of `classifier_run` / with `classifier_sha256`. A
classifier made elsewhere (the official file) is named by its file URI together with its
`classifier_sha256`.

Codes come from the committed Delta snapshot of a `latents` table, read through Ray Data
(status ok; a deterministic share `val_fraction` of image ids is held out for the before/after
figures), or are sampled through the inversion model's own mapping network (`model.checkpoint`,
W codes broadcast to W+, truncation `psi` towards the mapping net's mean; `sample.n_val` more
are drawn for the figures). Each batch is split in halves, sources and references; loss
`l2 * MSE(w_s, w_e) + ref * MSE(emb_k(w_e), emb_k(w_r)) + src * MSE(emb_notk(w_e),
emb_notk(w_s))` (weights `loss.*`, all 1.0), Adam lr 1e-4, weight decay 5e-4 (MODEL.md). The
figures use the `eval.max_pairs` pairs of smallest keys of the held-out split (collected
streaming on rank 0). Writes, per attribute,

    <output>/model_files/editor/<run_id>/editor_<attribute>.pt   official layout
        (encoder.module.transformerlayer.*, classifier.module.*, opts with the figures)

one `models` row per attribute (Delta table `<output>/models/`, committed by this run: a run
that fails before its commit publishes no editor) and the run record `<output>/_runs/<id>.json`.
The summary gives, per attribute, the loss parts on the held-out pairs before and after
training (`ref` is the target-embedding distance of the edited code to the reference;
`identity_ref` what leaving the source unchanged scores).

Counts, one per code: in = ok + failed + skipped; ok = codes used (train or held out),
skipped = latents rows whose inversion had failed; failed = 0 (no per-code failure here).
"""
from __future__ import annotations

import logging
import sys

from jobs.cli import input_errors, main
from jobs.settings.fit_editor import Settings
from pipeline import model_registry, storage
from pipeline.compute import actor_pool, device_for, fit, gpus_per_actor, retry_args
from pipeline.errors import JobError
from pipeline.fit_data import (
    SampleCodes,
    code_shape,
    codes_batch,
    id_split_batch,
    latent_counts,
    read_latents,
)
from pipeline.fit_loops import editor_loop
from pipeline.model_registry import MODELS
from pipeline.runner import JobRun
from pipeline.sections import ActorSection

log = logging.getLogger("stbatch.fit_editor")

JOB = "fit_editor"


SETTINGS = Settings


def model_file_keys(attrs: list[str], run_id: str) -> dict[str, str]:
    """Run-scoped keys of the editor files (an attribute name must make a safe key)."""
    keys = {}
    for a in attrs:
        try:
            keys[a] = model_registry.model_key("editor", run_id, f"editor_{a}.pt")
        except ValueError:
            raise JobError(f"attribute name {a!r} cannot be part of a file name") from None
    return keys


def build_datasets(cfg: Settings) -> tuple[dict, dict, dict]:
    """(datasets, counts, source description)."""
    import ray

    if cfg.latents:
        vf, seed = cfg.val_fraction, cfg.split_seed
        c = latent_counts(cfg.latents, vf, seed)
        n_ok, n_val = c["ok"], c["val"]
        if n_ok - n_val < 2:
            raise JobError(f"{n_ok - n_val} training codes in {cfg.latents}; need at least 2")
        shape = code_shape(cfg.latents)
        base = read_latents(cfg.latents, ["image_id", "face_index", "status", "w_plus"])
        ds = {s: base.map_batches(codes_batch, batch_format="pyarrow", batch_size=1024,
                                  fn_kwargs={"val_fraction": vf, "seed": seed, "keep": s, "shape": shape})
              for s in ("train", "val")}
        counts = {"in": c["in"], "ok": n_ok, "failed": 0, "skipped": c["in"] - n_ok}
        source = {"latents": cfg.latents, "n_train": n_ok - n_val, "n_val": n_val}
    else:
        s = cfg.sample
        n, n_val = s.n, s.n_val
        num_gpus = gpus_per_actor(s.num_gpus)
        kw = {"num_gpus": num_gpus} if num_gpus > 0 else {}
        # the actor is started once: the train and held-out codes are drawn in one pass (ids
        # [0, n) and [n, n + n_val)), then split by id
        codes = ray.data.range(n + n_val).map_batches(
            SampleCodes, batch_size=s.batch_size, batch_format="numpy", compute=actor_pool(1),
            fn_constructor_kwargs={"model": cfg.model, "sample": s, "device": device_for("auto", num_gpus)},
            **kw, **retry_args(ActorSection(), n + n_val)).materialize()
        ds = {sp: codes.map_batches(id_split_batch, batch_format="numpy", batch_size=1024,
                                    fn_kwargs={"n_train": n, "keep": sp}) for sp in ("train", "val")}
        counts = {"in": n + n_val, "ok": n + n_val, "failed": 0, "skipped": 0}
        source = {"sampled_from": cfg.model.checkpoint or cfg.model.preset, "truncation": s.truncation,
                  "n_train": n, "n_val": n_val}
    ds["train"] = ds["train"].select_columns(["w_plus"])
    if cfg.fit_editor.materialize:
        ds = {k: v.materialize() for k, v in ds.items()}
    return ds, counts, source


def format_figures(res: dict) -> str:
    lines = [f"{'attribute':<22} {'ref before':>11} {'ref after':>10} {'identity':>9} {'src after':>10} "
             f"{'l2 after':>9} {'loss before':>12} {'loss after':>11}"]
    for a, r in res.items():
        b, f = r["before"] or {}, r["after"] or {}
        lines.append(f"{a:<22} {b.get('ref', float('nan')):>11.4f} {f.get('ref', float('nan')):>10.4f} "
                     f"{f.get('identity_ref', float('nan')):>9.4f} {f.get('src', float('nan')):>10.4f} "
                     f"{f.get('l2', float('nan')):>9.4f} {b.get('total', float('nan')):>12.4f} "
                     f"{f.get('total', float('nan')):>11.4f}")
    return "\n".join(lines)


def resolve_classifier(cfg: Settings) -> dict:
    if not cfg.classifier:
        raise JobError("fit_editor: set classifier=URI")
    try:
        return model_registry.pick(cfg.classifier, "classifier", run_id=cfg.classifier_run,
                                   sha256=cfg.classifier_sha256)
    except LookupError as e:
        raise JobError(str(e)) from None


def check(cfg: Settings) -> list[str]:
    """What main checks before Ray starts: a classifier, an output, attributes, and codes to train
    on (a latents root that exists, or codes to sample)."""
    errors = [f"{k}: set {k}=URI" for k in ("classifier", "output") if not getattr(cfg, k)]
    if not cfg.attribute_names():
        errors.append("attributes: set attributes=[Name,...] (one editor per attribute)")
    if cfg.latents:
        errors += input_errors("latents", cfg.latents)
    elif cfg.sample.n < 2:
        errors.append("latents: set latents=URI, or model.checkpoint=URI with sample.n=N (N >= 2)")
    return errors


def run(cfg: Settings, before_commit=None) -> dict:
    """The job body (also callable from Python, after `check`; `before_commit(run)` is a test hook)."""
    import ray

    from stmodel.classifier import load_classifier

    if not cfg.output:
        raise JobError("fit_editor: set output=URI")
    output = cfg.output
    attrs = cfg.attribute_names()
    cm = resolve_classifier(cfg)
    clf = load_classifier(cm["uri"], sha256=cm["sha256"])
    unknown = [a for a in attrs if a not in clf.attributes]
    if unknown:
        raise JobError(f"unknown attribute(s) {unknown}; the classifier knows {clf.attributes}")
    r = JobRun(output, JOB, cfg)
    keys = model_file_keys(attrs, r.run_id)
    datasets, counts, source = build_datasets(cfg)
    shape = datasets["train"].take_batch(1, batch_format="numpy")["w_plus"].shape[1:]
    if tuple(shape) != (clf.n_latent, clf.style_dim):
        raise JobError(f"codes of shape {list(shape)} but the classifier takes [{clf.n_latent}, {clf.style_dim}]")
    del clf
    uris = {a: storage.join(output, keys[a]) for a in attrs}
    t = cfg.fit_editor
    log.info("fit_editor: %d attribute(s) %s, %s, %d steps each, classifier %s (%s) -> %s (run %s)", len(attrs),
             attrs, source, t.steps, cm["uri"], cm["sha256"][:12], output, r.run_id)
    res = fit(editor_loop, {"attributes": attrs, "classifier_uri": cm["uri"], "classifier_sha256": cm["sha256"],
                            "editor": cfg.editor, "loss": cfg.loss, "train": t, "eval": cfg.eval,
                            "editor_uris": uris, "run_id": r.run_id},
              datasets, t, f"{JOB}-{r.run_id}")
    print(format_figures(res), file=sys.stderr, flush=True)
    editors = {a: {"uri": v["uri"], "sha256": v["sha256"], "steps": v["steps"],
                   "loss_before": (v["before"] or {}).get("total"), "loss_after": (v["after"] or {}).get("total"),
                   "ref_before": (v["before"] or {}).get("ref"), "ref_after": (v["after"] or {}).get("ref"),
                   "identity_ref": (v["after"] or {}).get("identity_ref"),
                   "src_after": (v["after"] or {}).get("src"), "l2_after": (v["after"] or {}).get("l2"),
                   "pairs": (v["after"] or {}).get("pairs", 0)} for a, v in res.items()}
    rows = model_registry.model_rows([{"uri": v["uri"], "kind": "editor", "attribute": a, "sha256": v["sha256"]}
                                      for a, v in res.items()], r.run_id)
    results = {MODELS: r.write_small(MODELS, rows)}
    classifier = {"uri": cm["uri"], "sha256": cm["sha256"], "run_id": cm["run_id"]}
    extra = {"editors": editors, "source": source, "classifier": classifier}
    if before_commit is not None:
        before_commit(r)
    r.commit(results, {**counts, "seconds": r.seconds(), **extra},
             extra={"inputs": {"classifier": classifier, **source},
                    "figures": {a: {"before": v["before"], "after": v["after"]} for a, v in res.items()},
                    "history": {a: v["history"] for a, v in res.items()}, "ray": {"version": ray.__version__}})
    return {"run_id": r.run_id, "counts": counts, "extra": extra}


DESCRIPTION = __doc__


if __name__ == "__main__":
    main(JOB, DESCRIPTION, SETTINGS, run, trains=True, check=check)
