import math

import numpy as np
import pytest
import torch

from stmodel.checkpoint import CheckpointError
from stmodel.metrics import IDSimilarity, LPIPSMetric, alexnet_to_lpips, mse, psnr, summarize


def _pair(b=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    return a, (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)


def test_mse_psnr_against_hand_computation():
    # Constant images: in [0, 1] the two differ by 0.1 everywhere -> MSE 0.01 -> PSNR 20 dB;
    # in [-1, 1] they differ by 0.2 -> MSE 0.04 (pSp's convention).
    a = torch.full((2, 3, 8, 8), 0.0)
    b = torch.full((2, 3, 8, 8), 0.2)
    b[1] = -0.4  # second pair differs by 0.4 in [-1,1] = 0.2 in [0,1] -> PSNR 10*log10(25)
    assert torch.allclose(mse(a, b), torch.tensor([0.04, 0.16]), atol=1e-7)
    assert torch.allclose(psnr(a, b), torch.tensor([20.0, 10 * math.log10(25)]), atol=1e-4)
    assert torch.isinf(psnr(a, a)).all()
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


def test_lpips_identical_zero_and_label():
    torch.manual_seed(0)
    m = LPIPSMetric(allow_random_init=True)
    assert m.label == "lpips-alex-RANDOM-INIT (not a real LPIPS)"
    a, b = _pair(2, 64)
    assert m(a, a).abs().max() < 1e-6
    d = m(a, b)
    assert d.shape == (2,) and (d > 0).all()
    # Bigger inputs are area-pooled to 256: a 512 image equals its pooled 256 version.
    big = torch.rand(1, 3, 512, 512) * 2 - 1
    small = torch.nn.functional.avg_pool2d(big, 2)
    assert m(big, -big).item() == pytest.approx(m(small, -small).item(), rel=1e-4)


def test_lpips_loads_alexnet_backbone(tmp_path):
    import torchvision
    torch.manual_seed(123)
    sd = torchvision.models.alexnet(weights=None).state_dict()
    path = tmp_path / "alexnet.pth"
    torch.save(sd, path)
    torch.manual_seed(0)
    rand = LPIPSMetric(allow_random_init=True)
    real = LPIPSMetric(str(path))
    assert real.label == "lpips-alex-v0.1"
    own = real.net.net.state_dict()
    assert torch.equal(own["slice1.0.weight"], sd["features.0.weight"])
    assert torch.equal(own["slice5.10.bias"], sd["features.10.bias"])
    a, b = _pair(2, 64)
    assert not torch.allclose(rand(a, b), real(a, b))
    assert real(a, a).abs().max() < 1e-6
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


def test_id_similarity_identical_and_weights(tmp_path):
    from facenet_pytorch import InceptionResnetV1
    torch.manual_seed(0)
    m = IDSimilarity(allow_random_init=True)
    assert m.label == "facenet-RANDOM-INIT (not a real ID metric)"
    a, b = _pair(2, 128)
    s = m(a, a)
    assert s.shape == (2,) and torch.allclose(s, torch.ones(2), atol=1e-5)
    assert m.preprocess(a).shape == (2, 3, 160, 160)
    # The vggface2 file layout: the model's keys plus the 8631-way `logits` head.
    torch.manual_seed(7)
    sd = InceptionResnetV1(pretrained=None, classify=False).state_dict()
    sd["logits.weight"], sd["logits.bias"] = torch.zeros(8631, 512), torch.zeros(8631)
    torch.save(sd, tmp_path / "vggface2.pt")
    real = IDSimilarity(str(tmp_path / "vggface2.pt"))
    assert real.label == "facenet-vggface2"
    assert torch.equal(real.net.state_dict()["last_linear.weight"], sd["last_linear.weight"])
    assert torch.allclose(real(a, a), torch.ones(2), atol=1e-5)
    assert not torch.allclose(real.embed(a), m.embed(a))


def test_lpips_uses_the_shipped_v01_heads():
    import inspect
    import os

    import lpips

    from stmodel.checkpoint import load_bytes, read_bytes
    from stmodel.metrics import LPIPSMetric

    path = os.path.join(os.path.dirname(inspect.getfile(lpips.LPIPS)), "weights", "v0.1", "alex.pth")
    heads = load_bytes(read_bytes(path)[0], path)
    m = LPIPSMetric(allow_random_init=True)
    own = m.net.state_dict()
    assert len(heads) == 5
    for k, v in heads.items():
        assert torch.equal(own[k], v), k
