"""Model library: official key layout, checkpoint round trips, refusals, numerics."""
from __future__ import annotations

import io
import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stmodel.checkpoint import (
    CheckpointError,
    inversion_state,
    load_generator,
    load_inversion,
    save_generator,
    save_inversion,
)
from stmodel.config import get_preset
from stmodel.inversion import StyleTransformer
from stmodel.stylegan2 import Generator, make_kernel, upfirdn2d

DATA = Path(__file__).resolve().parent / "data"  # copied from shared/spec; see data/README.md


def expected_official_layout() -> dict[str, tuple]:
    """The inversion checkpoint's keys and shapes at ffhq-1024, written from MODEL.md's facts
    (IR-SE50 units, pyramid, three decoder layers, rosinality Generator at 1024)."""
    exp: dict[str, tuple] = {"encoder.module.z": (1, 18, 512)}

    def bn(p, c):
        exp.update({f"{p}.weight": (c,), f"{p}.bias": (c,), f"{p}.running_mean": (c,),
                    f"{p}.running_var": (c,), f"{p}.num_batches_tracked": ()})

    e = "encoder.module."
    exp[e + "input_layer.0.weight"] = (64, 3, 3, 3)
    bn(e + "input_layer.1", 64)
    exp[e + "input_layer.2.weight"] = (64,)
    unit, cin = 0, 64
    for depth, n in zip((64, 128, 256, 512), (3, 4, 14, 3)):
        for _ in range(n):
            p = f"{e}body.{unit}."
            if cin != depth:
                exp[p + "shortcut_layer.0.weight"] = (depth, cin, 1, 1)
                bn(p + "shortcut_layer.1", depth)
            bn(p + "res_layer.0", cin)
            exp[p + "res_layer.1.weight"] = (depth, cin, 3, 3)
            exp[p + "res_layer.2.weight"] = (depth,)
            exp[p + "res_layer.3.weight"] = (depth, depth, 3, 3)
            bn(p + "res_layer.4", depth)
            exp[p + "res_layer.5.fc1.weight"] = (depth // 16, depth, 1, 1)
            exp[p + "res_layer.5.fc2.weight"] = (depth, depth // 16, 1, 1)
            cin, unit = depth, unit + 1
    assert unit == 24
    exp.update({e + "latlayer1.weight": (512, 256, 1, 1), e + "latlayer1.bias": (512,),
                e + "latlayer2.weight": (512, 128, 1, 1), e + "latlayer2.bias": (512,)})
    for name in ("coarse", "medium", "fine"):
        p = f"{e}transformerlayer_{name}."
        for a in ("self_attn", "multihead_attn"):
            exp.update({f"{p}{a}.in_proj_weight": (1536, 512), f"{p}{a}.in_proj_bias": (1536,),
                        f"{p}{a}.out_proj.weight": (512, 512), f"{p}{a}.out_proj.bias": (512,)})
        exp.update({p + "linear1.weight": (1024, 512), p + "linear1.bias": (1024,),
                    p + "linear2.weight": (512, 1024), p + "linear2.bias": (512,)})
        for k in (1, 2, 3):
            exp.update({f"{p}norm{k}.weight": (512,), f"{p}norm{k}.bias": (512,)})
    d = "decoder.module."
    for i in range(1, 9):
        exp.update({f"{d}style.{i}.weight": (512, 512), f"{d}style.{i}.bias": (512,)})
    exp[d + "input.input"] = (1, 512, 4, 4)
    ch = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}

    def styled(p, cin, cout, up):
        exp.update({p + "conv.weight": (1, cout, cin, 3, 3), p + "conv.modulation.weight": (cin, 512),
                    p + "conv.modulation.bias": (cin,), p + "noise.weight": (1,), p + "activate.bias": (cout,)})
        if up:
            exp[p + "conv.blur.kernel"] = (4, 4)

    def torgb(p, cin, up):
        exp.update({p + "bias": (1, 3, 1, 1), p + "conv.weight": (1, 3, cin, 1, 1),
                    p + "conv.modulation.weight": (cin, 512), p + "conv.modulation.bias": (cin,)})
        if up:
            exp[p + "upsample.kernel"] = (4, 4)

    styled(d + "conv1.", 512, 512, False)
    torgb(d + "to_rgb1.", 512, False)
    cin = 512
    for i, log in enumerate(range(3, 11)):
        cout = ch[2 ** log]
        styled(f"{d}convs.{2 * i}.", cin, cout, True)
        styled(f"{d}convs.{2 * i + 1}.", cout, cout, False)
        torgb(f"{d}to_rgbs.{i}.", cout, True)
        cin = cout
    for i in range(17):
        r = 2 ** ((i + 5) // 2)
        exp[f"{d}noises.noise_{i}"] = (1, 1, r, r)
    return exp


@pytest.fixture(scope="module")
def ffhq_state():
    torch.manual_seed(0)
    return inversion_state(StyleTransformer(get_preset("ffhq-1024")))


def test_ffhq_layout_matches_model_md_facts(ffhq_state):
    ours = {k: tuple(v.shape) for k, v in ffhq_state["state_dict"].items()}
    exp = expected_official_layout()
    assert sorted(set(exp) - set(ours)) == []
    assert sorted(set(ours) - set(exp)) == []
    bad = {k: (ours[k], exp[k]) for k in exp if ours[k] != exp[k]}
    assert bad == {}
    assert len(ours) == 615
    assert tuple(ffhq_state["latent_avg"].shape) == (18, 512)


def test_ffhq_layout_matches_official_key_list(ffhq_state):
    spec = json.loads((DATA / "official_keys_ffhq.json").read_text())
    official = spec["state_dict"]
    ours = ffhq_state["state_dict"]
    assert set(ours) == set(official)
    for k, meta in official.items():
        assert list(ours[k].shape) == meta["shape"], k
        assert str(ours[k].dtype) == meta["dtype"], k
        if "values" in meta:  # the fixed blur / upsample filters
            assert torch.allclose(ours[k].flatten(), torch.tensor(meta["values"])), k


def _tiny(seed=0, preset="tiny-32") -> StyleTransformer:
    torch.manual_seed(seed)
    m = StyleTransformer(get_preset(preset))
    m.latent_avg.normal_()
    with torch.no_grad():  # zero at init: make the noise inputs matter
        for name, p in m.decoder.named_parameters():
            if name.endswith("noise.weight"):
                p.fill_(0.1)
    return m.eval()


def _images(cfg, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, cfg.input_size, cfg.input_size, generator=g) * 2 - 1


def test_tiny_round_trip_identical_outputs(tmp_path):
    m = _tiny()
    x = _images(m.cfg)
    with torch.no_grad():
        w0 = m.invert(x)
        y0 = m.reconstruct(w0)
    uri = f"file://{tmp_path}/ckpt.pt"
    digest = save_inversion(m, uri)
    m2, info = load_inversion(uri, sha256=digest)
    assert info.sha256 == digest
    with torch.no_grad():
        w1 = m2.invert(x)
        y1 = m2.reconstruct(w1)
    assert torch.equal(w0, w1)
    assert torch.equal(y0, y1)


def test_invert_reconstruct_shapes_and_determinism():
    m = _tiny(preset="tiny-64")
    cfg = m.cfg
    x = _images(cfg, n=2)
    with torch.no_grad():
        w = m.invert(x)
        assert w.shape == (2, cfg.n_latent, cfg.style_dim)
        assert torch.equal(w, m.invert(x))
        y = m.reconstruct(w)
        assert y.shape == (2, 3, cfg.pool_size, cfg.pool_size)
        assert torch.equal(y, m.reconstruct(w))  # fixed noise buffers by default
        y_rand = m.reconstruct(w, randomize_noise=True)
        assert not torch.equal(y, y_rand)
        full = m.reconstruct(w, resize=False)
        assert full.shape[-1] == cfg.size
        # invert does not run the generator
        called = []
        h = m.decoder.conv1.register_forward_hook(lambda *a: called.append(1))
        m.invert(x)
        h.remove()
        assert called == []
        # batch independence: the last partial batch is not special
        assert torch.allclose(m.invert(x[:1]), w[:1], atol=1e-5)


def test_more_queries_than_layers_like_cars(tmp_path):
    """cars-512: the encoder emits 18 codes and the 512 generator reads the first 16."""
    torch.manual_seed(3)
    cfg = get_preset("tiny-32").replace(n_queries=10)
    m = StyleTransformer(cfg).eval()
    m.latent_avg.normal_()
    uri = str(tmp_path / "cars_like.pt")
    save_inversion(m, uri)
    m2, _ = load_inversion(uri)
    assert m2.cfg.n_queries == 10
    w = m2.invert(_images(cfg, n=2))
    assert w.shape == (2, cfg.n_latent, cfg.style_dim)
    assert get_preset("cars-512").n_latent == 16


def _reference_modconv(conv, x, style):
    """The reference code's modulated conv, transcribed: per-sample weights, one grouped conv,
    transposed conv + blur for upsampling (native upfirdn2d)."""
    b, cin, h, w = x.shape
    s = F.linear(style, conv.modulation.weight * conv.modulation.scale,
                 conv.modulation.bias * conv.modulation.lr_mul).view(b, 1, cin, 1, 1)
    weight = conv.scale * conv.weight * s
    if conv.demodulate:
        demod = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8)
        weight = weight * demod.view(b, conv.out_channel, 1, 1, 1)
    k = conv.kernel_size
    x = x.view(1, b * cin, h, w)
    if conv.upsample:
        weight = weight.transpose(1, 2).reshape(b * cin, conv.out_channel, k, k)
        out = F.conv_transpose2d(x, weight, padding=0, stride=2, groups=b)
        out = out.view(b, conv.out_channel, out.shape[2], out.shape[3])
        return _upfirdn2d_reference(out, conv.blur.kernel, 1, 1, conv.blur.pad)
    out = F.conv2d(x, weight.view(b * conv.out_channel, cin, k, k), padding=conv.padding, groups=b)
    return out.view(b, conv.out_channel, out.shape[2], out.shape[3])


def _reference_generator(g, latent):
    def styled(layer, x, st, noise):
        out = _reference_modconv(layer.conv, x, st) + layer.noise.weight * noise
        return F.leaky_relu(out + layer.activate.bias.view(1, -1, 1, 1), 0.2) * math.sqrt(2)

    def torgb(layer, x, st, skip):
        out = _reference_modconv(layer.conv, x, st) + layer.bias
        if skip is not None:
            up = layer.upsample
            out = out + _upfirdn2d_reference(skip, up.kernel, up.factor, 1, up.pad)
        return out

    noise = g.fixed_noise()
    out = g.input.input.repeat(latent.shape[0], 1, 1, 1)
    out = styled(g.conv1, out, latent[:, 0], noise[0])
    skip = torgb(g.to_rgb1, out, latent[:, 1], None)
    i = 1
    for c1, c2, n1, n2, rgb in zip(g.convs[::2], g.convs[1::2], noise[1::2], noise[2::2], g.to_rgbs):
        out = styled(c1, out, latent[:, i], n1)
        out = styled(c2, out, latent[:, i + 1], n2)
        skip = torgb(rgb, out, latent[:, i + 2], skip)
        i += 2
    return skip


@pytest.mark.parametrize("batch", [1, 3])
def test_generator_equals_reference_formulation(batch):
    m = _tiny(seed=5, preset="tiny-64")
    with torch.no_grad():
        for p in m.decoder.parameters():  # non-trivial biases everywhere
            if p.ndim <= 1 or p.shape[-1] == 1:
                p.add_(torch.randn_like(p) * 0.1)
        w = torch.randn(batch, m.cfg.n_latent, m.cfg.style_dim)
        ours = m.decoder(w)
        ref = _reference_generator(m.decoder, w)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()
    with torch.enable_grad():  # the autograd (training) path computes the same
        assert torch.allclose(m.decoder(w), ours, atol=1e-5)
        assert torch.allclose(m.decoder(w, channels_last=False), ours, atol=1e-4)


def _upfirdn2d_reference(x, kernel, up, down, pad):
    """The reference (native) upfirdn2d: zero-insert, pad, correlate with the flipped kernel."""
    b, c, h, w = x.shape
    out = x.reshape(-1, h, 1, w, 1, 1)
    out = F.pad(out, [0, 0, 0, up - 1, 0, 0, 0, up - 1]).view(-1, h * up, w * up, 1)
    p0, p1 = pad
    out = F.pad(out, [0, 0, max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)])
    out = out[:, max(-p0, 0): out.shape[1] - max(-p1, 0), max(-p0, 0): out.shape[2] - max(-p1, 0), :]
    out = out.permute(0, 3, 1, 2).reshape(-1, 1, h * up + p0 + p1, w * up + p0 + p1)
    k = torch.flip(kernel, [0, 1]).view(1, 1, *kernel.shape)
    out = F.conv2d(out, k)
    out = out.reshape(b, c, out.shape[-2], out.shape[-1])
    return out[:, :, ::down, ::down]


@pytest.mark.parametrize("up,down,pad", [(2, 1, (2, 1)), (1, 1, (2, 2)), (1, 2, (1, 1)), (2, 1, (-1, 1))])
def test_upfirdn2d_matches_reference(up, down, pad):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9)
    k = make_kernel([1, 3, 3, 1]) * (up ** 2)
    k = k + torch.arange(16.0).view(4, 4) * 0.01  # asymmetric: checks the flip
    assert torch.allclose(upfirdn2d(x, k, up, down, pad), _upfirdn2d_reference(x, k, up, down, pad), atol=1e-6)


def test_refuses_truncated_file(tmp_path):
    m = _tiny()
    p = tmp_path / "full.pt"
    save_inversion(m, str(p))
    data = p.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_inversion(str(tmp_path / "cut.pt"))
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_inversion(str(tmp_path / "empty.pt"))


def test_refuses_wrong_shape_naming_key_and_shapes(tmp_path):
    m = _tiny()
    state = inversion_state(m)
    key = "encoder.module.latlayer1.weight"
    good = tuple(state["state_dict"][key].shape)
    state["state_dict"][key] = torch.zeros(7, 3, 1, 1)
    buf = io.BytesIO()
    torch.save(state, buf)
    (tmp_path / "bad.pt").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError) as e:
        load_inversion(str(tmp_path / "bad.pt"))
    msg = str(e.value)
    assert "latlayer1.weight" in msg and "[7, 3, 1, 1]" in msg and str(list(good)) in msg


def test_refuses_missing_and_unexpected_keys(tmp_path):
    state = inversion_state(_tiny())
    del state["state_dict"]["encoder.module.latlayer2.bias"]
    state["state_dict"]["encoder.module.extra.weight"] = torch.zeros(1)
    buf = io.BytesIO()
    torch.save(state, buf)
    (tmp_path / "keys.pt").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError) as e:
        load_inversion(str(tmp_path / "keys.pt"))
    assert "missing keys (1): latlayer2.bias" in str(e.value)
    assert "unexpected keys (1): extra.weight" in str(e.value)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/stbatch_pwned",))


def test_refuses_pickle_that_runs_code(tmp_path):
    marker = Path("/tmp/stbatch_pwned")
    marker.unlink(missing_ok=True)
    state = inversion_state(_tiny())
    state["opts"]["evil"] = _RunsCode()
    buf = io.BytesIO()
    torch.save(state, buf, pickle_module=pickle)
    (tmp_path / "evil.pt").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="safe loader"):
        load_inversion(str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_refuses_sha256_mismatch(tmp_path):
    p = str(tmp_path / "c.pt")
    save_inversion(_tiny(), p)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_inversion(p, sha256="0" * 64)


def _reference_mapping(g: Generator, z: torch.Tensor) -> torch.Tensor:
    """rosinality's mapping net, transcribed: PixelNorm over the features, then n_mlp
    EqualLinear layers (weight * lr_mul / sqrt(in), bias * lr_mul) with leaky ReLU 0.2 * sqrt(2)."""
    x = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)
    lr = g.cfg.lr_mlp
    for layer in list(g.style)[1:]:
        w = layer.weight * (lr / math.sqrt(layer.weight.shape[1]))
        x = F.leaky_relu(x @ w.T + layer.bias * lr, 0.2) * math.sqrt(2)
    return x


def test_plain_stylegan2_file_and_computed_latent_avg(tmp_path):
    torch.manual_seed(2)
    cfg = get_preset("tiny-32")
    g = Generator(cfg).eval()
    p = str(tmp_path / "g.pt")
    save_generator(g, p)
    g2, avg, _ = load_generator(p, cfg, n_mean=2000)
    assert avg.shape == (cfg.n_latent, cfg.style_dim)
    # Independently: the mapping net written out from the rosinality formulas, on 2000 z drawn
    # from a generator seeded with MEAN_LATENT_SEED (0), averaged in float64; every row the same.
    z = torch.randn(2000, cfg.style_dim, generator=torch.Generator().manual_seed(0))
    expected = _reference_mapping(g, z).double().mean(0).float()
    assert torch.allclose(avg, expected.expand_as(avg), atol=1e-5), (avg[0] - expected).abs().max()
    other = torch.randn(2000, cfg.style_dim, generator=torch.Generator().manual_seed(1))
    assert (expected - _reference_mapping(g, other).mean(0)).abs().max() > 1e-3  # the seed is seen
    # seeded: the same file gives the same mean every time
    _, avg2, _ = load_generator(p, cfg, n_mean=2000)
    assert torch.equal(avg, avg2)
    w = torch.randn(2, cfg.n_latent, cfg.style_dim)
    with torch.no_grad():
        assert torch.equal(g(w), g2(w))
    save_generator(g, p, latent_avg=avg[0])
    _, avg3, _ = load_generator(p, cfg)
    assert torch.equal(avg3[0], avg[0])
    with pytest.raises(CheckpointError, match="g_ema"):
        load_inversion_path = str(tmp_path / "inv.pt")
        save_inversion(_tiny(), load_inversion_path)
        load_generator(load_inversion_path, cfg)


def test_truncation_moves_towards_mean():
    torch.manual_seed(4)
    g = Generator(get_preset("tiny-32")).eval()
    w = torch.randn(1, g.n_latent, g.style_dim)
    mean = torch.zeros(g.style_dim)
    with torch.no_grad():
        assert torch.allclose(g(w, truncation=0.0, truncation_latent=mean), g(torch.zeros_like(w)), atol=1e-6)


def test_load_from_s3(s3_bucket):
    m = _tiny(seed=9)
    uri = f"{s3_bucket}/models/tiny.pt"
    digest = save_inversion(m, uri)
    m2, info = load_inversion(uri, sha256=digest)
    x = _images(m.cfg, n=1)
    with torch.no_grad():
        assert torch.equal(m.invert(x), m2.invert(x))
    assert info.uri == uri


def test_subsample_equals_reference_maxpool():
    from stmodel.encoder import Subsample

    x = torch.randn(2, 8, 15, 16)
    for s in (1, 2):
        assert torch.equal(Subsample(s)(x), torch.nn.MaxPool2d(1, s)(x))


def test_encoder_weights_held_in_autocast_dtype():
    m = _tiny(seed=6, preset="tiny-64")
    x = _images(m.cfg, n=2)
    with torch.no_grad():
        ref = m.invert(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = m.invert(x)
        m.cast_encoder_weights(torch.bfloat16)
        assert m.encoder.latlayer1.weight.dtype == torch.bfloat16
        assert m.encoder.input_layer[1].weight.dtype == torch.float32  # norms stay fp32
        held = m.invert(x)  # runs under autocast by itself
        m.cast_encoder_weights(None)
        back = m.invert(x)
    assert held.dtype == torch.float32
    assert torch.allclose(held, auto, atol=1e-2)
    assert 0 < (held - ref).abs().max() < 0.1
    assert torch.allclose(back, ref, atol=1e-2)  # fp32 again (weights were rounded to bf16 once)
