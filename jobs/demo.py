"""The embedded demo: the whole system on one laptop, with nothing downloaded.

    python -m jobs.demo [--set output=demo_out] [--set train_encoder.steps=1500]

No pretrained weights exist here, so the demo builds what it needs and says so:
  1. a seeded tiny StyleGAN2 generator (tiny-32), and a training set sampled from it whose true
     W+ codes are known;
  2. trains the tiny Style Transformer encoder on it (jobs.train_encoder, Ray Train) and shows
     that it learned: reconstruction PSNR against the mean-latent baseline and its untrained
     self, and the error to the true codes;
  3. runs the real jobs on a local folder standing in for object storage: align (scikit-image's
     astronaut and transformed copies, plus inputs that must fail), invert, fit_classifier
     (labels defined from the known codes), fit_editor, edit and evaluate; invert and edit paste
     the astronaut faces back into their photos (`paste_back`), so the report shows the whole
     photos before | after; every table is a Delta table under the folder and the models come
     from the committed `models` table;
  4. scores every face with the committed classifier (jobs.score) and looks for near-duplicates
     (jobs.neighbors, its defaults: crop space, ratio rule) among the faces, where 12 validation
     images were also given as copies re-encoded as JPEG q60, scaled by 0.8 and cropped by 2-5 %:
     it prints how many of those planted pairs it found and how many other pairs it grouped (the
     astronaut's transformed copies, one photo, counted apart);
  5. compacts the tables' small files (jobs.maintain), writes the HTML report (jobs.report) and
     prints where it is.
LPIPS and ID similarity need real backbone weights, which this machine does not have: the
demo leaves them uncomputed (null, labelled) rather than report numbers from random networks.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from jobs import ray_logs
from jobs.cli import main
from jobs.settings import SETTINGS as JOB_SETTINGS
from jobs.settings.demo import Settings
from pipeline import delta, storage
from pipeline.config import Section, SettingsError, parse
from pipeline.schemas import nested_list_array
from pipeline.status import STATUS_OK

log = logging.getLogger("stbatch.demo")

JOB = "demo"
ATTRIBUTES = ("synthetic_a", "synthetic_b", "synthetic_c")


SETTINGS = Settings

METRICS_NO_WEIGHTS = {"metric_weights": {"skip_missing": True}}
# The encoder's checkpoint exists once step 2 has trained it; the later jobs' settings are
# built (and checked) before, naming this, and get the real file from `with_checkpoint`.
TRAINED = "<the encoder trained in step 2>"


def say(step: str, msg: str) -> None:
    print(f"[demo] {step}: {msg}", flush=True)


# ---------------------------------------------------------------- 1. generator and data

def build_generator(preset: str, seed: int):
    from stmodel.config import get_preset
    from stmodel.stylegan2 import Generator

    torch.manual_seed(seed)
    g = Generator(get_preset(preset)).eval()
    with torch.no_grad():  # zero at init; a little noise makes the images less flat
        for name, p in g.named_parameters():
            if name.endswith("noise.weight"):
                p.fill_(0.05)
    return g


def sample_dataset(g, root: str, n_train: int, n_val: int, truncation: float, seed: int) -> dict:
    """PNG images of the generator with their true W+ codes (W broadcast to every layer) and
    attribute labels defined from those codes: sign of the projection on fixed directions."""
    from pipeline.decode import image_id
    from pipeline.images import encode_png
    from pipeline.scoring import to_uint8

    gen = torch.Generator().manual_seed(seed + 1)
    avg = g.mean_latent(20_000, seed=seed)
    n = n_train + n_val
    with torch.no_grad():
        z = torch.randn(n, g.style_dim, generator=gen)
        w = avg + truncation * (g.style(z) - avg)
        w_plus = w.unsqueeze(1).repeat(1, g.n_latent, 1)
        imgs = np.concatenate([to_uint8(g(w_plus[i:i + 64])) for i in range(0, n, 64)])
    dirs = torch.randn(len(ATTRIBUTES), g.style_dim, generator=gen)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    labels = ((w - avg) @ dirs.t() > 0).int().numpy()
    files, ids = [], []
    for i in range(n):
        data = encode_png(imgs[i])
        name = f"img_{i:05d}.png"
        sub = "val" if i < n_val else "train"
        storage.write_bytes(storage.join(root, "synthetic", sub, name), data)
        files.append(name)
        ids.append(image_id(data))
    codes = pa.table({"file": files, "image_id": ids,
                      "w_plus": nested_list_array(w_plus.numpy(), shape=(g.n_latent, g.style_dim))})
    os.makedirs(storage.join(root, "synthetic_meta"), exist_ok=True)
    pq.write_table(codes, storage.join(root, "synthetic_meta", "codes.parquet"))
    attrs = pa.table({"image_id": ids, **{a: labels[:, k] for k, a in enumerate(ATTRIBUTES)}})
    pq.write_table(attrs, storage.join(root, "synthetic_meta", "attributes.parquet"))
    np.save(storage.join(root, "synthetic_meta", "direction_synthetic_a.npy"), dirs[0].numpy().astype(np.float32))
    return {"avg": avg, "dirs": dirs, "ids": ids}


# ---------------------------------------------------------------- 3. real photos

def write_photos(folder: str) -> int:
    """scikit-image's astronaut, transformed copies of it, and inputs that must fail."""
    from PIL import Image
    from skimage import data

    base = Image.fromarray(data.astronaut())
    photos = {"astronaut.png": base,
              "astronaut_rot20.jpg": base.rotate(20, resample=Image.Resampling.BICUBIC, expand=True),
              "astronaut_small_shift.jpg": Image.fromarray(
                  np.pad(np.asarray(base.resize((300, 300))), ((40, 100), (120, 20), (0, 0)), mode="edge")),
              "astronaut_rot-12_big.png": base.resize((720, 720)).rotate(-12, resample=Image.Resampling.BICUBIC)}
    os.makedirs(folder, exist_ok=True)
    for name, im in photos.items():
        im.convert("RGB").save(os.path.join(folder, name))
    grad = np.linspace(0, 255, 256 * 256 * 3).reshape(256, 256, 3).astype(np.uint8)
    Image.fromarray(grad).save(os.path.join(folder, "no_face.png"))
    with open(os.path.join(folder, "notes.jpg"), "w") as f:
        f.write("not an image: the job must report it, not crash")
    return len(photos) + 2


# ---------------------------------------------------------------- planted near-duplicates

PLANTED = 12  # validation images also given as near copies


def near_copy(rgb: np.ndarray, rng: np.random.Generator) -> bytes:
    """JPEG q60 of the photo scaled by 0.8 and cropped by 2-5 % on each side (JPEG bytes): the
    near-duplicate of issue 21's acceptance test."""
    import io

    from PIL import Image

    im = Image.fromarray(rgb)
    w, h = im.size
    im = im.resize((round(w * 0.8), round(h * 0.8)), Image.Resampling.BICUBIC)
    w, h = im.size
    left, top, right, bottom = (rng.uniform(0.02, 0.05, 4) * [w, h, w, h]).round().astype(int)
    im = im.crop((left, top, w - right, h - bottom))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=60)
    return buf.getvalue()


def plant_copies(root: str, n: int, seed: int) -> list[tuple[str, str]]:
    """Near copies of the first `n` validation images in `<root>/planted/`: (original, copy) files."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        src = storage.join(root, "synthetic", "val", f"img_{i:05d}.png")
        rgb = np.asarray(Image.open(src).convert("RGB"))
        dst = storage.join(root, "planted", f"copy_{i:05d}.jpg")
        storage.write_bytes(dst, near_copy(rgb, rng))
        pairs.append((src, dst))
    return pairs


def planted_found(root: str, pairs: list[tuple[str, str]]) -> tuple[int, int, int]:
    """(planted pairs whose two faces share a duplicate group, pairs of other faces grouped
    together, pairs of the astronaut's faces grouped together): read from the demo's small
    committed tables. The astronaut photos are transformed copies of one photo, so grouping
    them is right and counts apart."""
    lat = delta.read_committed_arrow(root, "latents", columns=["image_id", "source_uri"])
    ids = dict(zip(lat["source_uri"].to_pylist(), lat["image_id"].to_pylist()))
    g = delta.read_committed_arrow(root, "duplicate_groups", columns=["image_id", "group_id", "group_size"])
    group = dict(zip(g["image_id"].to_pylist(), g["group_id"].to_pylist()))
    truth = {frozenset((ids[a], ids[b])) for a, b in pairs if a in ids and b in ids}
    members: dict = {}
    for iid, gid in group.items():
        members.setdefault(gid, []).append(iid)
    grouped = {frozenset((a, b)) for m in members.values() for i, a in enumerate(m) for b in m[i + 1:]}
    astronaut = {iid for uri, iid in ids.items() if "/photos/" in uri}
    same_photo = {p for p in grouped - truth if p <= astronaut}
    return len(grouped & truth), len(grouped - truth - same_photo), len(same_photo)


# ---------------------------------------------------------------- the demo

def requests_uri(root: str, name: str) -> str:
    return storage.join(root, "requests", f"edit_requests_{name}.parquet")


def plan(cfg: Settings, root: str) -> dict[str, Section]:
    """The settings of every job the demo runs, by step, built before the first runs: a value
    out of a job's range (the demo's `align_size`, `train_encoder.*`, `fit.*`) stops the demo
    before anything is trained. Raises SettingsError naming the step of each problem."""
    tr, fit = cfg.train_encoder, cfg.fit
    model = {"checkpoint": TRAINED, "name": "demo-tiny-encoder"}
    edit_common = {"latents": root, "output": root, "model": model, "classifier": root, "editors": root,
                   **METRICS_NO_WEIGHTS}
    steps: dict[str, tuple[str, dict]] = {
        "train_encoder": ("train_encoder", {
            "input": f"{root}/synthetic/train", "val_input": f"{root}/synthetic/val", "output": root,
            "val_codes": f"{root}/synthetic_meta/codes.parquet",
            "model": {"generator": storage.join(root, "models", "generator.pt"), "preset": cfg.preset,
                      "seed": cfg.seed},
            "train_encoder": {"lpips": 0, "id": 0, "steps": tr.steps, "batch_size": tr.batch_size, "lr": tr.lr,
                              "log_every": tr.log_every, "val_every": tr.val_every,
                              "checkpoint_every": tr.checkpoint_every, "val_images": min(64, cfg.n_val)}}),
        "align": ("align", {"input": f"{root}/photos", "output": root, "align": {"size": cfg.align_size}}),
        "invert_faces": ("invert", {"input": root, "output": root, "metrics": True, "paste_back": True,
                                    "model": model, **METRICS_NO_WEIGHTS}),
        "invert_synthetic": ("invert", {"input": f"{root}/synthetic", "output": root, "metrics": True,
                                        "model": model, **METRICS_NO_WEIGHTS}),
        "invert_planted": ("invert", {"input": f"{root}/planted", "output": root, "model": model}),
        "fit_classifier": ("fit_classifier", {
            "latents": root, "attributes": f"{root}/synthetic_meta/attributes.parquet", "output": root,
            "fit_classifier": {"epochs": fit.classifier_epochs, "batch_size": 32, "lr": 0.001}}),
        "score": ("score", {"latents": root}),
        "neighbors": ("neighbors", {"input": root}),
        "fit_editor": ("fit_editor", {
            "latents": root, "classifier": root, "output": root, "attributes": ["synthetic_a"],
            "fit_editor": {"steps": fit.editor_steps, "batch_size": 32, "lr": 0.001}}),
        "edit_photos": ("edit", {"requests": requests_uri(root, "photos"), "paste_back": True, **edit_common}),
        "edit_synthetic": ("edit", {"requests": requests_uri(root, "synthetic"), **edit_common}),
        "evaluate": ("evaluate", {"input": root, "model": model, **METRICS_NO_WEIGHTS}),
        "maintain": ("maintain", {"output": root}),
        "report": ("report", {"input": root}),
    }
    out: dict[str, Section] = {}
    errors: list[str] = []
    for step, (job, data) in steps.items():
        try:
            out[step] = parse(JOB_SETTINGS[job], {"progress": False, **data})
        except SettingsError as e:
            errors += [f"the demo's {step} run: {m}" for m in e.errors]
    if errors:
        raise SettingsError(errors)
    return out


def with_checkpoint(settings: Section, checkpoint: str) -> Section:
    """`settings` whose model section names the trained encoder's checkpoint instead of TRAINED."""
    model = getattr(settings, "model", None)
    if model is None or model.checkpoint != TRAINED:
        return settings
    return dataclasses.replace(settings, model=dataclasses.replace(model, checkpoint=checkpoint))  # type: ignore[type-var]


def check(cfg: Settings) -> list[str]:
    """Before Ray starts: every job's settings the demo will build are valid."""
    try:
        plan(cfg, os.path.abspath(cfg.output))
    except SettingsError as e:
        return e.errors
    return []


def run(cfg: Settings) -> dict:
    from jobs import (
        align,
        edit,
        evaluate,
        fit_classifier,
        fit_editor,
        invert,
        maintain,
        neighbors,
        report,
        score,
        train_encoder,
    )
    from stmodel.checkpoint import save_generator

    t_start = time.time()
    root = os.path.abspath(cfg.output)
    settings = plan(cfg, root)
    os.makedirs(root, exist_ok=True)
    timings, summaries = {}, {}

    def job(name: str, module) -> dict:
        t = time.time()
        res = module.run(settings[name])
        timings[name] = round(time.time() - t, 1)
        summaries[name] = res
        say(name, f"{json.dumps(res['counts'])} in {timings[name]} s")
        return res

    say("1/10 generator", f"seeded {cfg.preset} StyleGAN2 generator, {cfg.n_train} training + "
                         f"{cfg.n_val} validation images with known W+ codes")
    g = build_generator(cfg.preset, cfg.seed)
    gen_uri = storage.join(root, "models", "generator.pt")
    save_generator(g, gen_uri, latent_avg=g.mean_latent(20_000, seed=cfg.seed))
    data = sample_dataset(g, root, cfg.n_train, cfg.n_val, cfg.truncation, cfg.seed)

    say("2/10 train_encoder", f"{cfg.train_encoder.steps} steps of the pSp L2 objective (LPIPS/ID off: no backbone "
                             "weights here), Ray Train, one CPU worker")
    res = job("train_encoder", train_encoder)
    ev = res["extra"]["eval"]
    say("2/10 train_encoder", "validation PSNR: trained {:.2f} dB | mean latent {:.2f} dB | untrained {:.2f} dB; "
        "W+ MSE to true codes: trained {:.4f} | mean latent {:.4f} | untrained {:.4f}".format(
            ev["trained"]["psnr"], ev["mean_latent"]["psnr"], ev["untrained"]["psnr"],
            ev["trained"]["w_mse"], ev["mean_latent"]["w_mse"], ev["untrained"]["w_mse"]))
    ckpt = res["extra"]["checkpoint"]
    settings = {step: with_checkpoint(s, ckpt) for step, s in settings.items()}

    photos = write_photos(os.path.join(root, "photos"))
    say("3/10 align", f"{photos} photos: the astronaut and transformed copies, a photo without a face, "
                     "a text file named .jpg")
    job("align", align)

    say("4/10 invert", "aligned astronaut faces (reconstructions pasted back into the photos), then the "
                      "synthetic images (with reconstructions and PSNR)")
    job("invert_faces", invert)
    job("invert_synthetic", invert)
    planted = plant_copies(root, PLANTED, cfg.seed)
    job("invert_planted", invert)

    say("5/10 fit_classifier", f"latent classifier for {', '.join(ATTRIBUTES)} (labels from the true codes)")
    job("fit_classifier", fit_classifier)

    say("5/10 score", "every face's probability of each attribute (the committed classifier)")
    job("score", score)
    job("neighbors", neighbors)
    found, other, same_photo = planted_found(root, planted)
    say("5/10 neighbors", f"{PLANTED} validation images were also given as near copies (JPEG q60, scaled 0.8, "
                         f"cropped 2-5 %): planted pairs found: {found}/{len(planted)}; other pairs grouped: {other} "
                         f"(and {same_photo} pairs of the astronaut's transformed copies; defaults: crop space, "
                         "ratio 0.45)")
    near_dups = {"planted": len(planted), "found": found, "other_pairs": other, "astronaut_pairs": same_photo}

    say("6/10 fit_editor", "reference-based edit transformer for synthetic_a")
    job("fit_editor", fit_editor)

    say("7/10 edit", "label, reference and direction edits of the astronaut faces, pasted back into their "
                    "photos, then of some synthetic images (no photo to paste into)")
    edit_requests(root, data["ids"][:4])
    job("edit_photos", edit)
    job("edit_synthetic", edit)

    say("8/10 evaluate", "reconstruction metrics of the latents table against the crops")
    job("evaluate", evaluate)

    say("9/10 maintain", "compaction of the small files the runs left (vacuum keeps a week of history)")
    job("maintain", maintain)

    say("10/10 report", "HTML report")
    rep = job("report", report)
    seconds = round(time.time() - t_start, 1)
    out = {"root": root, "report": rep["extra"].get("report"), "eval": ev, "near_duplicates": near_dups,
           "timings": timings}
    storage.write_bytes(storage.join(root, "demo_summary.json"), json.dumps(out, indent=2, default=str).encode())
    logs = ray_logs.current()
    say("done", f"{seconds} s; open {out['report']}" + (f" (Ray's own logs: {logs})" if logs else ""))
    counts = {"in": len(summaries), "ok": len(summaries), "failed": 0, "skipped": 0}
    return {"run_id": None, "counts": counts, "extra": {"report": out["report"], "eval": ev,
                                                        "near_duplicates": near_dups, "timings": timings}}


def edit_requests(root: str, synthetic_ids: list[str]) -> tuple[str, str]:
    """One request of each kind per source face: the aligned astronauts (whose photos the edits
    are pasted back into), and a few synthetic ones (no photo); one requests file for each."""
    import pyarrow.compute as pc

    # the aligned photo faces (the faces table) that have an ok code; the demo's tables are small
    aligned = delta.read_committed_arrow(root, "faces", columns=["image_id"],
                                         filter_expr=pc.field("status") == STATUS_OK)
    ok = delta.read_committed_arrow(root, "latents", columns=["image_id", "face_index"], filter_expr=(
        pc.field("status") == STATUS_OK) & pc.field("image_id").isin(pc.unique(aligned["image_id"]).to_pylist()))
    faces = sorted(ok.to_pylist(), key=lambda r: (r["image_id"], r["face_index"]))[:4]
    ref = synthetic_ids[-1]
    cols = ["image_id", "face_index", "kind", "attribute", "strength", "target", "reference_image_id",
            "direction_uri"]
    uris = []
    synthetic: list[dict[str, Any]] = [{"image_id": i, "face_index": 0} for i in synthetic_ids[:2]]
    for name, sources in (("photos", faces), ("synthetic", synthetic)):
        rows = []
        for s in sources:
            base = {"image_id": s["image_id"], "face_index": int(s["face_index"]), "attribute": "synthetic_a"}
            rows += [{**base, "kind": "label", "strength": 3.0, "target": 1},
                     {**base, "kind": "label", "strength": 3.0, "target": 0},
                     {**base, "kind": "reference", "reference_image_id": ref},
                     {**base, "kind": "direction", "strength": 4.0,
                      "direction_uri": f"{root}/synthetic_meta/direction_synthetic_a.npy"}]
        rows = [{c: r.get(c) for c in cols} for r in rows]  # from_pylist takes its columns from row 0
        uri = requests_uri(root, name)
        os.makedirs(os.path.dirname(uri), exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), uri)
        uris.append(uri)
    return uris[0], uris[1]


if __name__ == "__main__":
    main(JOB, __doc__, SETTINGS, run, trains=True, check=check)
