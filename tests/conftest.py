"""Shared fixtures: a real S3 API on loopback (moto's server) and one local Ray per session."""
from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-compatible server on 127.0.0.1 (a free port), used through s3fs as in production.

    It runs in its own process: delta-rs keeps Python's GIL during some of its S3 requests, which
    would stall a server running in a thread of this process. Credentials and the endpoint are
    set in the environment, exactly as a real deployment would set them (AWS_ENDPOINT_URL is
    read by botocore, hence by s3fs and by Ray workers, and by delta-rs)."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                raise RuntimeError("moto's server did not start") from None
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                             "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    yield endpoint
    server.terminate()
    server.wait(timeout=30)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; returns its `s3://` URI."""
    import boto3
    import s3fs

    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the whole session (started after the S3 endpoint exists, so workers
    inherit it)."""
    import ray

    # The dashboard stays on: Ray Train v2 watches its controller through the state API.
    ray.init(address="local", num_cpus=2, ignore_reinit_error=True, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def seeded_tiny_model(preset: str = "tiny-32", seed: int = 0):
    """A tiny inversion model with non-trivial noise weights and latent_avg (seeded)."""
    import torch

    from stmodel.config import get_preset
    from stmodel.inversion import StyleTransformer

    torch.manual_seed(seed)
    m = StyleTransformer(get_preset(preset))
    with torch.no_grad():
        m.latent_avg.normal_()
        for name, p in m.decoder.named_parameters():
            if name.endswith("noise.weight"):
                p.fill_(0.1)
    return m.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny-32 Style Transformer saved in the official layout; returns (path, sha256)."""
    from stmodel.checkpoint import save_inversion

    path = tmp_path_factory.mktemp("models") / "tiny32.pt"
    digest = save_inversion(seeded_tiny_model(), str(path))
    return str(path), digest


def write_crops(folder, n: int, size: int = 64, seed: int = 0, prefix: str = "face") -> list:
    """`n` distinct smooth RGB crops as PNG files (different bytes, so different image_ids)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        a, b, c = rng.uniform(0.5, 3.0, 3)
        img = np.stack([np.sin(a * xx * 6 + i), np.cos(b * yy * 6 - i), np.sin(c * (xx + yy) * 4)], -1)
        img = ((img + 1) * 127.5).clip(0, 255).astype(np.uint8)
        p = os.path.join(folder, f"{prefix}_{seed}_{i:03d}.png")
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def kill_tagged(tag: str) -> None:
    """SIGKILL every process whose environment carries STBATCH_TEST_TREE=<tag>: what a test
    started, however deep (never `ray stop`, which would kill every Ray on the machine)."""
    import signal

    needle = f"\0STBATCH_TEST_TREE={tag}\0".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in b"\0" + f.read():
                    os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
