"""A corpus with planted near-duplicates, as issue 21 states it: distinct photos (windows of
scikit-image's bundled sample photos, none overlapping another, none near-uniform), and for some
of them a copy re-encoded as JPEG quality 60, scaled by 0.8 and cropped by a few percent."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from jobs.demo import near_copy

SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
           "stereo_motorcycle", "camera", "coins", "moon", "grass", "gravel", "brick", "colorwheel")


def distinct_photos(n: int, size: int = 128, min_std: float = 25.0) -> list[np.ndarray]:
    """`n` RGB windows of `size` px, disjoint, taken round-robin across the sample photos (so
    neighbours in the list come from different photos)."""
    import skimage.data as data

    per_source = []
    for name in SOURCES:
        img = getattr(data, name)()
        img = img[0] if isinstance(img, tuple) else img
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = np.ascontiguousarray(img[..., :3]).astype(np.uint8)
        wins = [img[y:y + size, x:x + size] for y in range(0, img.shape[0] - size + 1, size)
                for x in range(0, img.shape[1] - size + 1, size)]
        per_source.append([w for w in wins if w.std() >= min_std])
    out: list[np.ndarray] = []
    i = 0
    while len(out) < n:
        if not any(per_source):
            raise ValueError(f"only {len(out)} distinct windows of {size} px in the sample photos")
        src = per_source[i % len(per_source)]
        if src:
            out.append(src.pop(0))
        i += 1
    return out


def planted_corpus(folder: str, n_distinct: int, n_planted: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n_distinct` PNG photos in `folder`, and a near copy of the first `n_planted` of them
    (`copy_*.jpg`). Returns the (original, copy) path pairs."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    pairs = []
    for i, rgb in enumerate(distinct_photos(n_distinct)):
        orig = os.path.join(folder, f"photo_{i:03d}.png")
        Image.fromarray(rgb).save(orig)
        if i < n_planted:
            cp = os.path.join(folder, f"copy_{i:03d}.jpg")
            with open(cp, "wb") as f:
                f.write(near_copy(rgb, rng))
            pairs.append((orig, cp))
    return pairs
