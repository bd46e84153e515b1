"""The authors' outputs: this project's public path against golden values computed once with the
authors' released Style Transformer code on the same seeded official-layout weights.

tests/data/golden/ (copied from shared/golden/, see tests/data/README.md) holds the golden
outputs, the two input PNGs and `official_weights.py`, which builds the weights from the key
lists in tests/data/ (seed 1). Both checkpoints are built here, written to files and read back
through the loaders a job uses (`load_inversion`, `load_editor`, `load_classifier`); images go
through `to_model_input`, the job's preprocessing. The bound, 1e-4, is the golden README's
(measured agreement: W+ within 6e-6, images within 6e-5; fp32, CPU).
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.decode import image_id
from pipeline.images import to_model_input
from stmodel.checkpoint import load_inversion
from stmodel.classifier import load_classifier
from stmodel.editor import load_editor

DATA = Path(__file__).resolve().parent / "data"
GOLDEN = DATA / "golden"
SEED = 1
ATOL = 1e-4
NAMES = ("pattern.png", "noise.png")


def _official_weights():
    spec = importlib.util.spec_from_file_location("golden_official_weights", GOLDEN / "official_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def golden() -> dict:
    g = torch.load(GOLDEN / "golden_seed1.pt", map_location="cpu", weights_only=True)
    assert g["seed"] == SEED
    return g


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """The two official-layout checkpoints, built from the key lists and saved to files."""
    build = _official_weights().build
    out = tmp_path_factory.mktemp("golden_ckpts")
    paths = {}
    for what, keys in (("ffhq", "official_keys_ffhq.json"), ("edit", "official_keys_edit.json")):
        paths[what] = str(out / f"{what}.pt")
        torch.save(build(str(DATA / keys), SEED), paths[what])
    return paths


@pytest.fixture(scope="module")
def inverted(checkpoints, golden):
    """W+ and the 256 reconstructions of the two PNGs, through the job's preprocessing."""
    model, _ = load_inversion(checkpoints["ffhq"])
    assert model.cfg.size == 1024 and not model.training
    out = {}
    for name in NAMES:
        data = (GOLDEN / name).read_bytes()
        assert image_id(data) == golden["files"][name]["sha256"] == hashlib.sha256(data).hexdigest()
        rgb = np.asarray(Image.open(GOLDEN / name).convert("RGB"))
        assert rgb.shape == (256, 256, 3)
        x = torch.from_numpy(to_model_input(rgb, model.cfg.input_size))[None]
        with torch.no_grad():
            w = model.invert(x)
            y = model.reconstruct(w)
        out[name] = (w[0], y[0])
    return out


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, (what, tuple(ours.shape), tuple(ref.shape))
    err = (ours.float() - ref).abs().max().item()
    print(f"\n{what}: max abs error {err:.2e} (values up to {ref.abs().max().item():.2f})")
    assert err <= ATOL, f"{what}: max abs error {err:.3e} > {ATOL}"


@pytest.mark.parametrize("name", NAMES)
def test_wplus_codes_match_the_authors(inverted, golden, name):
    _close(inverted[name][0], golden["files"][name]["codes"], f"{name} W+")


@pytest.mark.parametrize("name", NAMES)
def test_reconstructions_match_the_authors(inverted, golden, name):
    _close(inverted[name][1], golden["files"][name]["image_256"], f"{name} image_256")


def test_golden_edit_inputs_are_the_golden_codes(golden):
    e, f = golden["edit"], golden["files"]
    assert torch.equal(e["src"], torch.stack([f[n]["codes"] for n in NAMES]))
    assert torch.equal(e["ref"], e["src"].flip(0))


def test_edit_transformer_matches_the_authors(checkpoints, golden):
    editor, _, _ = load_editor(checkpoints["edit"])
    assert not editor.training and not editor.query_norm  # the released editor: plain attention
    e = golden["edit"]
    with torch.no_grad():
        mix = editor(e["src"], e["ref"])
    _close(mix, e["mix"], "edit mix")


def test_latent_classifier_matches_the_authors(checkpoints, golden):
    e = golden["edit"]
    # Through the editor's loader (classifier inside the edit file) and the classifier loader.
    _, from_edit, _ = load_editor(checkpoints["edit"])
    direct = load_classifier(checkpoints["edit"])
    for clf, how in ((from_edit, "load_editor"), (direct, "load_classifier")):
        assert clf is not None and clf.n_latent == 18 and clf.style_dim == 512 and clf.n_attributes == 40
        with torch.no_grad():
            logits, emb = clf(e["src"])
        _close(logits, e["logits"], f"classifier logits ({how})")
        _close(emb, e["embeddings"], f"classifier embeddings ({how})")


def test_queries_follow_z_token_by_token(checkpoints, tmp_path):
    """What the golden data cannot see: its seeded mapping net (unit-normal weights times
    lr_mul 0.01 / sqrt(512)) maps all 18 `z` tokens to one vector (spread < 1e-9), so the golden
    W+ is blind to the order of the queries. Here the mapping weights get rosinality's init scale
    (randn / lr_mul) so the tokens differ; the queries must then be the mapping net applied to
    each `z` token on its own (MODEL.md), in order, and W+ row i must follow token i."""
    ckpt = torch.load(checkpoints["ffhq"], map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    for i in range(1, 9):
        sd[f"decoder.module.style.{i}.weight"] = sd[f"decoder.module.style.{i}.weight"] * 100.0
    path = str(tmp_path / "ffhq_mapped.pt")
    torch.save(ckpt, path)
    model, _ = load_inversion(path)

    z = sd["encoder.module.z"][0]  # [18, 512]
    x = z * torch.rsqrt(z.pow(2).mean(dim=-1, keepdim=True) + 1e-8)  # PixelNorm per token
    for i in range(1, 9):  # EqualLinear(512, 512, lr_mul 0.01) + fused leaky ReLU
        w, b = sd[f"decoder.module.style.{i}.weight"], sd[f"decoder.module.style.{i}.bias"]
        x = F.leaky_relu(x @ (w * 0.01 / math.sqrt(512)).T + b * 0.01, 0.2) * math.sqrt(2)
    assert (x - x.mean(0)).abs().max() > 0.1  # the tokens differ
    with torch.no_grad():
        q = model.queries(2)
    assert q.shape == (2, 18, 512) and torch.equal(q[0], q[1])
    assert torch.allclose(q[0], x, atol=1e-5), (q[0] - x).abs().max()

    # Swapping two z tokens swaps the same two W+ rows (before latent_avg) and nothing else.
    rgb = np.asarray(Image.open(GOLDEN / "pattern.png").convert("RGB"))
    img = torch.from_numpy(to_model_input(rgb, 256))[None]
    with torch.no_grad():
        before = model.invert(img)[0] - model.latent_avg
        z_swapped = model.encoder.z.detach().clone()
        z_swapped[0, [0, 17]] = z_swapped[0, [17, 0]]
        model.encoder.z.copy_(z_swapped)
        after = model.invert(img)[0] - model.latent_avg
    assert (before[0] - before[17]).abs().max() > 1e-2
    perm = list(range(18))
    perm[0], perm[17] = 17, 0
    assert torch.allclose(after, before[perm], atol=1e-4), (after - before[perm]).abs().max()
