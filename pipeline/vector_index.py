"""The vector index behind jobs.neighbors (faiss): which index for how many vectors, built once,
shipped as bytes through Ray's object store, searched by an actor pool.

    kind = choose_kind(n, "auto", exact_below)            # flat (exact) | ivf | hnsw
    index = build(vectors, "cosine", kind, nlist, nprobe) # in one Ray task
    buf = serialize(index)                                 # np.uint8: ray.put(buf) -> every actor
    dist, pos = search(deserialize(buf), queries, k)       # distances: cosine 1 - cos, l2 Euclidean

Cosine search is inner product on L2-normalised vectors (`prepare`). faiss's GPU build has the
same API (`faiss.index_cpu_to_gpu`); this project installs the CPU wheel.
"""
from __future__ import annotations

import math

import numpy as np

METRICS = ("cosine", "l2")
KINDS = ("flat", "ivf", "hnsw")
# Below this many vectors, exact search (every query against every vector) costs less than an
# IVF index's training and is exact: bench/neighbors.py measures both (README, Analytics).
EXACT_BELOW = 50_000
# IVF lists searched per query: 4 of 2 sqrt(n) kept recall@10 at 1.0 on bench/neighbors.py's
# 1M clustered vectors and brought the run under 10 minutes on 2 cores (8: over; README)
DEFAULT_NPROBE = 4


def choose_kind(n: int, kind: str = "auto", exact_below: int = EXACT_BELOW) -> str:
    if kind != "auto":
        if kind not in KINDS:
            raise ValueError(f"index kind must be auto or one of {KINDS}, got {kind!r}")
        return kind
    return "flat" if n < int(exact_below) else "ivf"


def default_nlist(n: int) -> int:
    """IVF lists: 2 sqrt(n), each list trained on >= 39 vectors: half the cost of faiss's usual
    4 sqrt(n) in training and in placing the queries (bench/neighbors.py)."""
    return int(max(1, min(2 * math.sqrt(max(n, 1)), n // 39 if n >= 39 else 1)))


def center_of(v: np.ndarray, metric: str) -> np.ndarray | None:
    """What `prepare` subtracts for L2: the mean vector. faiss computes squared L2 distances as
    |x|^2 + |y|^2 - 2 x.y in float32, which loses the small distances of near-duplicates when
    every code carries a large common offset (W+ codes around the mean latent); moving the
    origin to the mean changes no distance and keeps them."""
    return np.asarray(v, np.float64).mean(axis=0).astype(np.float32) if metric == "l2" and len(v) else None


def prepare(v: np.ndarray, metric: str, center: np.ndarray | None = None) -> np.ndarray:
    """float32, C-contiguous, L2-normalised for cosine (a zero vector stays zero), minus
    `center` for L2."""
    v = np.ascontiguousarray(v, dtype=np.float32)
    if metric == "l2" and center is not None:
        v = v - center
    if metric == "cosine":
        norm = np.linalg.norm(v, axis=1, keepdims=True)
        v = v / np.where(norm > 0, norm, 1.0)
    elif metric != "l2":
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return np.ascontiguousarray(v, dtype=np.float32)


def build(vectors: np.ndarray, metric: str, kind: str, nlist: int | None = None, nprobe: int = DEFAULT_NPROBE,
          hnsw_m: int = 32, ef_search: int = 64, train_size: int | None = None, niter: int = 10, seed: int = 0):
    """An index over `vectors` (already `prepare`d). IVF's k-means runs `niter` iterations on at
    most `train_size` vectors (default: 40 per list, just over faiss's minimum of 39), a seeded
    sample: at a million vectors its training would otherwise cost more than the search."""
    import faiss

    n, d = vectors.shape
    mt = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    index: faiss.Index
    if kind == "flat":
        index = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
    elif kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(d, int(hnsw_m), mt)
        hnsw.hnsw.efSearch = int(ef_search)
        index = hnsw
    elif kind == "ivf":
        nlist = int(nlist or default_nlist(n))
        quantizer = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
        ivf = faiss.IndexIVFFlat(quantizer, d, nlist, mt)
        ivf.cp.niter = int(niter)
        m = min(n, int(train_size or 40 * nlist))
        sample = vectors if m >= n else vectors[np.sort(np.random.default_rng(seed).choice(n, m, replace=False))]
        ivf.train(sample)
        ivf.nprobe = int(min(nprobe, nlist))
        index = ivf
    else:
        raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
    index.add(vectors)
    return index


def serialize(index) -> np.ndarray:
    import faiss

    return faiss.serialize_index(index)


def deserialize(buf: np.ndarray, nprobe: int | None = None, ef_search: int | None = None):
    import faiss

    index = faiss.deserialize_index(np.asarray(buf, dtype=np.uint8))
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and nprobe:
        ivf.nprobe = int(nprobe)
    if ef_search and hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(ef_search)
    return index


def search(index, queries: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(distances [N, k], positions [N, k]; -1 where fewer than k were found). Cosine distance is
    1 - cosine similarity, L2 the Euclidean distance (faiss returns it squared)."""
    k = int(min(k, index.ntotal))
    raw, pos = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    dist = 1.0 - raw if metric == "cosine" else np.sqrt(np.maximum(raw, 0.0))
    return dist.astype(np.float32), pos
