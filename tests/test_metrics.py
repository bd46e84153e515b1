"""Metrics against their references: LPIPS against `lpips.LPIPS(net='alex', version='0.1')`
built the standard way (its alexnet handed the same trunk), ID similarity against
facenet-pytorch's InceptionResnetV1 on `fixed_image_standardization` of the same crop, MSE /
PSNR against hand-computed values. Nothing is downloaded: lpips gets its AlexNet through a
patched `torchvision.models.alexnet`, its v0.1 heads from the file the package ships."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stmodel.checkpoint import CheckpointError
from stmodel.metrics import IDSimilarity, LPIPSMetric, alexnet_to_lpips, mse, psnr, summarize

LPIPS_TOL = 1e-5
ID_TOL = 1e-5


def _pair(b=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    return a, (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)


def _seeded_alexnet_state(seed: int) -> dict:
    import torchvision
    torch.manual_seed(seed)
    return torchvision.models.alexnet(weights=None).state_dict()


def _reference_lpips(monkeypatch, alexnet_state: dict):
    """`lpips.LPIPS(net='alex', version='0.1')` as its README builds it (pretrained heads), with
    torchvision's alexnet patched (inside lpips.pretrained_networks) to return `alexnet_state`
    instead of downloading the ImageNet weights."""
    import lpips
    import lpips.pretrained_networks as pn

    real_alexnet = pn.tv.alexnet

    def alexnet(*args, **kwargs):
        net = real_alexnet(weights=None)
        net.features.load_state_dict({k[len("features."):]: v for k, v in alexnet_state.items()
                                      if k.startswith("features.")})  # LPIPS reads only the trunk
        return net

    monkeypatch.setattr(pn.tv, "alexnet", alexnet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net="alex", version="0.1", verbose=False)
    monkeypatch.undo()
    for k, v in alexnet_state.items():  # the trunk really is the one handed over
        if k.startswith("features."):
            idx = k.split(".")[1]
            slice_name = next(n for n, c in ref.net.named_children() if idx in dict(c.named_children()))
            assert torch.equal(ref.net.state_dict()[f"{slice_name}.{k[len('features.'):]}"], v), k
    return ref.eval()


def _lpips_trunk_as_alexnet(lp_net: torch.nn.Module) -> dict:
    """lpips' `sliceS.N.*` keys back to torchvision's `features.N.*`."""
    return {"features." + k.split(".", 1)[1]: v for k, v in lp_net.state_dict().items()}


def _seeded_facenet(seed: int):
    """A seeded InceptionResnetV1 (pretrained=None) whose BatchNorm statistics come from one
    pass over seeded smooth images: with the default statistics every input embeds to nearly the
    same vector (cosine > 0.9999), which would make any preprocessing look right."""
    from facenet_pytorch import InceptionResnetV1
    torch.manual_seed(seed)
    net = InceptionResnetV1(pretrained=None, classify=False)
    for mod in net.modules():
        if isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            mod.momentum = None  # cumulative average: the statistics of this one batch
            mod.reset_running_stats()
    g = torch.Generator().manual_seed(seed)
    calib = F.interpolate(torch.rand(8, 3, 16, 16, generator=g), size=(160, 160), mode="bicubic") * 2 - 1
    net.train()
    with torch.no_grad():
        net(calib)
    return net.eval()


def _reference_id(net, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """facenet's pipeline on a 256 FFHQ-aligned image: pSp's face box (rows 35:223, cols 32:220),
    resized to 160 (bilinear, antialiased, on floats, as the project resizes), 0..255 pixel
    values, `fixed_image_standardization`, InceptionResnetV1, cosine similarity."""
    from facenet_pytorch import fixed_image_standardization

    def emb(x):
        x255 = (x.clamp(-1, 1) + 1) * 127.5
        face = x255[:, :, 35:223, 32:220]
        face = F.interpolate(face, size=(160, 160), mode="bilinear", align_corners=False, antialias=True)
        return net(fixed_image_standardization(face))

    with torch.no_grad():
        return F.cosine_similarity(emb(a), emb(b), dim=1)


def _u8_pair(b=2, size=256, seed=0):
    """Smooth image pairs whose pixels are exact uint8 values (x = u8 / 127.5 - 1)."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(b, 3, 16, 16, generator=g), size=(size, size), mode="bicubic",
                         align_corners=False)
    noisy = base + 0.15 * F.interpolate(torch.randn(b, 3, 32, 32, generator=g), size=(size, size), mode="bilinear")
    u8a = (base.clamp(0, 1) * 255).round()
    u8b = (noisy.clamp(0, 1) * 255).round()
    return u8a / 127.5 - 1, u8b / 127.5 - 1


def test_mse_psnr_against_hand_computation():
    # Constant images: in [0, 1] the two differ by 0.1 everywhere -> MSE 0.01 -> PSNR 20 dB;
    # in [-1, 1] they differ by 0.2 -> MSE 0.04 (pSp's convention).
    a = torch.full((2, 3, 8, 8), 0.0)
    b = torch.full((2, 3, 8, 8), 0.2)
    b[1] = -0.4  # second pair differs by 0.4 in [-1,1] = 0.2 in [0,1] -> PSNR 10*log10(25)
    assert torch.allclose(mse(a, b), torch.tensor([0.04, 0.16]), atol=1e-7)
    assert torch.allclose(psnr(a, b), torch.tensor([20.0, 10 * math.log10(25)]), atol=1e-4)
    assert torch.isinf(psnr(a, a)).all()
    # One value of 48 differs by 1 in [-1, 1]: MSE 1/48; in [0, 1] by 0.5: MSE 0.25/48 ->
    # PSNR 10 * log10(48 / 0.25) = 10 * log10(192) = 22.8330 dB.
    c, d = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    d[0, 1, 2, 3] = 1.0
    assert mse(c, d).item() == pytest.approx(1 / 48, abs=1e-8)
    assert psnr(c, d).item() == pytest.approx(22.8330, abs=1e-4)
    # Clamped to [-1, 1] as a saved image would be.
    assert torch.allclose(mse(torch.full((1, 3, 2, 2), 3.0), torch.ones(1, 3, 2, 2)), torch.zeros(1))


def test_psnr_is_vectorised_per_image():
    a, b = _pair(5)
    per = torch.stack([psnr(a[i:i + 1], b[i:i + 1])[0] for i in range(5)])
    assert torch.allclose(psnr(a, b), per)
    assert psnr(a, b).shape == (5,)


def test_summarize_ignores_nan():
    s = summarize(torch.tensor([1.0, float("nan"), 3.0, 2.0]))
    assert s["n"] == 3 and s["mean"] == pytest.approx(2.0) and s["p50"] == pytest.approx(2.0)
    assert s["p95"] == pytest.approx(np.percentile([1, 2, 3], 95))
    assert summarize([])["n"] == 0 and math.isnan(summarize([float("nan")])["mean"])


def test_random_init_needs_the_flag():
    with pytest.raises(ValueError, match="allow_random_init"):
        LPIPSMetric()
    with pytest.raises(ValueError, match="allow_random_init"):
        IDSimilarity()


def test_lpips_identical_zero_and_label(monkeypatch):
    torch.manual_seed(0)
    m = LPIPSMetric(allow_random_init=True)
    assert m.label == "lpips-alex-RANDOM-INIT (not a real LPIPS)"
    a, b = _pair(2, 64)
    assert m(a, a).abs().max() < 1e-6
    d = m(a, b)
    # The random trunk is still a real LPIPS computation: lpips itself, fed that trunk, agrees.
    ref = _reference_lpips(monkeypatch, _lpips_trunk_as_alexnet(m.net.net))
    with torch.no_grad():
        expected = ref(a, b, normalize=False).flatten()
    assert d.shape == (2,) and torch.allclose(d, expected, atol=LPIPS_TOL, rtol=0), (d, expected)
    # Bigger inputs are area-pooled to 256: a 512 image equals its pooled 256 version.
    big = torch.rand(1, 3, 512, 512) * 2 - 1
    small = torch.nn.functional.avg_pool2d(big, 2)
    assert m(big, -big).item() == pytest.approx(m(small, -small).item(), rel=1e-4)


def test_lpips_equals_the_lpips_package_with_the_same_trunk(tmp_path, monkeypatch):
    sd = _seeded_alexnet_state(123)
    path = tmp_path / "alexnet.pth"
    torch.save(sd, path)
    real = LPIPSMetric(str(path))
    assert real.label == "lpips-alex-v0.1"
    own = real.net.net.state_dict()
    assert torch.equal(own["slice1.0.weight"], sd["features.0.weight"])
    assert torch.equal(own["slice5.10.bias"], sd["features.10.bias"])
    ref = _reference_lpips(monkeypatch, sd)
    for size, seed in ((256, 1), (64, 2)):
        a, b = _pair(3, size, seed)
        ours = real(a, b)
        with torch.no_grad():
            expected = ref(a, b, normalize=False).flatten()
        print(f"\nLPIPS {size}px ours {ours.tolist()} lpips {expected.tolist()}")
        assert ours.shape == (3,) and torch.allclose(ours, expected, atol=LPIPS_TOL, rtol=0), (ours, expected)
        assert (expected > 1e-3).all()  # distances worth comparing
    assert real(a, a).abs().max() < 1e-6
    # Out-of-range inputs are clamped first, as a saved image would be.
    with torch.no_grad():
        clamped = ref((a * 3).clamp(-1, 1), (b * 3).clamp(-1, 1), normalize=False).flatten()
    assert torch.allclose(real(a * 3, b * 3), clamped, atol=LPIPS_TOL, rtol=0)
    # A file that is not an AlexNet is refused with the key named.
    bad = dict(sd)
    bad["features.3.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="slice2.3.weight"):
        LPIPSMetric(str(tmp_path / "bad.pth"))


def test_alexnet_key_mapping_covers_all_backbone_params():
    import torchvision
    torch.manual_seed(0)
    m = LPIPSMetric(allow_random_init=True)
    mapped = alexnet_to_lpips(torchvision.models.alexnet(weights=None).state_dict(), m.net.net)
    assert set(mapped) == set(m.net.net.state_dict())


def test_id_similarity_equals_facenet_on_the_standardised_crop(tmp_path):
    torch.manual_seed(0)
    m = IDSimilarity(allow_random_init=True)
    assert m.label == "facenet-RANDOM-INIT (not a real ID metric)"
    a, b = _u8_pair(2, 256)
    s = m(a, a)
    assert s.shape == (2,) and torch.allclose(s, torch.ones(2), atol=1e-5)
    assert m.preprocess(a).shape == (2, 3, 160, 160)
    # The vggface2 file layout: the model's keys plus the 8631-way `logits` head.
    ref_net = _seeded_facenet(7)
    sd = ref_net.state_dict()
    sd["logits.weight"], sd["logits.bias"] = torch.zeros(8631, 512), torch.zeros(8631)
    torch.save(sd, tmp_path / "vggface2.pt")
    real = IDSimilarity(str(tmp_path / "vggface2.pt"))
    assert real.label == "facenet-vggface2"
    assert torch.equal(real.net.state_dict()["last_linear.weight"], sd["last_linear.weight"])
    assert torch.allclose(real(a, a), torch.ones(2), atol=1e-5)
    ours, expected = real(a, b), _reference_id(ref_net, a, b)
    print(f"\nID similarity ours {ours.tolist()} facenet {expected.tolist()}")
    assert torch.allclose(ours, expected, atol=ID_TOL, rtol=0), (ours, expected)
    assert (expected < 0.99).all()  # not trivially 1
    # The crop and the standardisation matter: a whole-image resize, or the [-1, 1] values
    # without facenet's 127.5 / 128, give other numbers than the reference.
    with torch.no_grad():
        whole = F.cosine_similarity(*(ref_net(F.interpolate(x, size=(160, 160), mode="bilinear", antialias=True)
                                              * (127.5 / 128)) for x in (a, b)), dim=1)
    assert (whole - expected).abs().max() > 100 * ID_TOL


def test_id_similarity_close_to_facenet_extract_face_on_uint8(tmp_path):
    """facenet's own face extraction (`extract_face`: PIL crop + bilinear resize to 160 on the
    uint8 image) followed by `fixed_image_standardization`: the project resizes floats instead,
    so agreement is to the uint8 rounding of the resized face, not to 1e-5."""
    from facenet_pytorch import fixed_image_standardization
    from facenet_pytorch.models.utils.detect_face import extract_face
    from PIL import Image

    net = _seeded_facenet(7)
    torch.save(net.state_dict(), tmp_path / "facenet.pt")
    ours = IDSimilarity(str(tmp_path / "facenet.pt"))
    a, b = _u8_pair(2, 256, seed=3)

    def emb(x):
        faces = []
        for img in x:
            u8 = ((img + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            faces.append(extract_face(Image.fromarray(u8), [32, 35, 220, 223], image_size=160))
        with torch.no_grad():
            return net(fixed_image_standardization(torch.stack(faces)))

    expected = F.cosine_similarity(emb(a), emb(b), dim=1)
    got = ours(a, b)
    print(f"\nID similarity ours {got.tolist()} facenet extract_face {expected.tolist()}")
    assert torch.allclose(got, expected, atol=5e-3, rtol=0), (got, expected)


def test_lpips_uses_the_shipped_v01_heads(monkeypatch):
    """Our heads are the ones lpips' own `LPIPS(pretrained=True)` loads, and they are not the
    heads' random init (a metric that skipped loading them would still build)."""
    import lpips

    m = LPIPSMetric(allow_random_init=True)
    own = m.net.state_dict()
    ref = _reference_lpips(monkeypatch, _seeded_alexnet_state(0)).state_dict()
    heads = [k for k in ref if k.startswith("lin") and not k.startswith("lins.")]
    assert len(heads) == 5
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation (pnet_rand: no download)
        fresh = lpips.LPIPS(net="alex", version="0.1", pretrained=False, pnet_rand=True, verbose=False).state_dict()
    for k in heads:
        assert torch.equal(own[k], ref[k]), k
        assert not torch.equal(fresh[k], ref[k]), k
        assert (ref[k] >= 0).all()  # v0.1 heads are non-negative channel weights
