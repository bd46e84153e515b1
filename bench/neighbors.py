"""jobs.neighbors at scale: k = 10 neighbours of 1,000,000 synthetic 512-d embeddings.

    python -m bench.neighbors                         # 1M vectors, the job's defaults, recall on 20k
    python -m bench.neighbors --n 200000 --sample 5000
    python -m bench.neighbors --crossover             # flat (exact) vs ivf: build + search time by size

The vectors have the cluster structure of face embeddings: a mixture of `--clusters` Gaussians
around random unit centres, each point the centre plus isotropic noise of norm `--spread`
(0.8: about 0.6 cosine similarity between two faces of one cluster, as photos of one person
under a real FaceNet), L2-normalised. They are made by Ray tasks and written as an
`embeddings` Delta table (not timed); then `jobs.neighbors.run` is timed over it as a user
runs it (space=identity), with the driver's peak RSS growth. Recall@k: for `--sample` faces,
the job's neighbours against an exact search (faiss IndexFlatIP over every vector, in a Ray
task). The driver never holds the vectors.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time

import numpy as np
import pyarrow as pa


def synthetic_block(batch: dict, n: int, dim: int, clusters: int, spread: float, seed: int) -> pa.Table:
    """Ray task: the `embeddings` rows of vector numbers [start, stop) (deterministic per number)."""
    from pipeline.schemas import embeddings_schema, make_table, nested_list_array

    centres = np.random.default_rng(seed).standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = []
    for start, stop in zip(batch["start"], batch["stop"]):
        rng = np.random.default_rng([seed, int(start)])
        m = int(stop) - int(start)
        label = rng.integers(0, clusters, m)
        v = centres[label] + rng.standard_normal((m, dim)).astype(np.float32) * (spread / np.sqrt(dim))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        ids = [vector_id(i) for i in range(int(start), int(stop))]
        schema = embeddings_schema(dim)
        t = make_table({"image_id": ids, "face_index": np.zeros(m, np.int32), "status": ["ok"] * m,
                        "backbone": ["synthetic"] * m}, schema, "bench")
        out.append(t.set_column(schema.get_field_index("embedding"), schema.field("embedding"),
                                nested_list_array(v, pa.float32(), shape=(dim,))))
    return pa.concat_tables(out)


def vector_id(i: int) -> str:
    return hashlib.sha256(f"synthetic-{i}".encode()).hexdigest()


def write_embeddings(root: str, n: int, dim: int, clusters: int, spread: float, seed: int, block: int = 20_000) -> None:
    import ray

    from jobs.embed import EMBEDDINGS
    from pipeline.runner import JobRun

    starts = list(range(0, n, block))
    items = ray.data.from_items([{"start": s, "stop": min(n, s + block)} for s in starts],
                                override_num_blocks=len(starts))
    ds = items.map_batches(synthetic_block, batch_size=1, batch_format="numpy",
                           fn_kwargs={"n": n, "dim": dim, "clusters": clusters, "spread": spread, "seed": seed})
    r = JobRun(root, "bench_embeddings", rows_per_file=block)
    res = r.write(ds, EMBEDDINGS)
    r.commit({EMBEDDINGS: res}, {"in": n, **res.counts})


def recall_task(root: str, sample: int, k: int, space: str, seed: int) -> dict:
    """Ray task: recall@k of the committed `neighbors` rows of `sample` faces against an exact
    search over every vector of the `embeddings` table."""
    import faiss
    import pyarrow.compute as pc

    from pipeline import delta
    from pipeline.schemas import nested_list_to_numpy

    faiss.omp_set_num_threads(os.cpu_count() or 1)  # a 1-CPU Ray task would search on one thread
    emb = delta.read_committed_arrow(root, "embeddings", columns=["image_id", "embedding"])
    ids = emb["image_id"].to_numpy(zero_copy_only=False)
    v = np.ascontiguousarray(nested_list_to_numpy(emb["embedding"]))
    del emb
    index = faiss.IndexFlatIP(v.shape[1])
    index.add(v)
    pick = np.sort(np.random.default_rng(seed).choice(len(ids), sample, replace=False))
    t0 = time.time()
    _, pos = index.search(v[pick], k + 1)
    exact_s = time.time() - t0
    want = {ids[q]: [ids[p] for p in row if p >= 0 and ids[p] != ids[q]][:k] for q, row in zip(pick, pos)}
    nb = delta.read_committed_arrow(root, "neighbors", columns=["image_id", "neighbor_image_id"],
                                   filter_expr=(pc.field("space") == space)
                                   & pc.field("image_id").isin(pa.array(list(want), pa.string())))
    got: dict = {}
    for a, b in zip(nb["image_id"].to_pylist(), nb["neighbor_image_id"].to_pylist()):
        got.setdefault(a, set()).add(b)
    hits = [len(got.get(q, set()) & set(w)) / k for q, w in want.items()]
    return {"recall_at_k": round(float(np.mean(hits)), 4), "sample": sample, "exact_search_s": round(exact_s, 1)}


def crossover(sizes: list[int], dim: int, clusters: int, spread: float, k: int, nprobe: int) -> list[dict]:
    """Flat (exact) against IVF, in this process: build + search of every vector, by size."""
    from pipeline import vector_index

    out = []
    for n in sizes:
        t = synthetic_block({"start": [0], "stop": [n]}, n, dim, clusters, spread, 0)
        from pipeline.schemas import nested_list_to_numpy

        v = vector_index.prepare(nested_list_to_numpy(t["embedding"]), "cosine")
        row: dict[str, float] = {"n": n}
        exact = np.empty((0, k + 1), np.int64)
        for kind in ("flat", "ivf"):
            t0 = time.time()
            index = vector_index.build(v, "cosine", kind, nprobe=nprobe)
            _, pos = vector_index.search(index, v, k + 1, "cosine")
            row[f"{kind}_s"] = round(time.time() - t0, 2)
            if kind == "flat":
                exact = pos
            else:
                hits = [len(set(a) & set(b)) / (k + 1) for a, b in zip(pos, exact)]
                row["ivf_recall"] = round(float(np.mean(hits)), 4)
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=3000)
    p.add_argument("--spread", type=float, default=0.8)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--sample", type=int, default=20_000)
    p.add_argument("--threshold", type=float, default=0.05)
    p.add_argument("--set", action="append", default=[], dest="sets", help="a jobs.neighbors setting, key=value")
    p.add_argument("--root", default=None, help="dataset root (default: a temporary folder, removed after)")
    p.add_argument("--crossover", action="store_true", help="only the flat / ivf crossover, in this process")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    a = p.parse_args()
    if a.crossover:
        from pipeline.vector_index import DEFAULT_NPROBE

        crossover(a.sizes, a.dim, a.clusters, a.spread, a.k, DEFAULT_NPROBE)
        return
    import ray

    from bench.scale import PeakRSS
    from jobs import neighbors
    from jobs.cli import load_config

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    tmp = None
    root = a.root
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_neighbors_")
        root = os.path.join(tmp.name, "ds")
    t0 = time.time()
    write_embeddings(root, a.n, a.dim, a.clusters, a.spread, 0)
    setup_s = time.time() - t0
    cfg = load_config(neighbors.SETTINGS, None, [f"input={root}", "space=identity", f"k={a.k}",
                                                 f"threshold={a.threshold}", "progress=false", *a.sets])
    with PeakRSS() as rss:
        t0 = time.time()
        res = neighbors.run(cfg)
        job_s = time.time() - t0
    rec = ray.get(ray.remote(recall_task).options(num_cpus=1).remote(root, min(a.sample, a.n), a.k, "identity", 1))
    print(json.dumps({"n": a.n, "dim": a.dim, "clusters": a.clusters, "k": a.k, "cpus": os.cpu_count(),
                      "setup_write_embeddings_s": round(setup_s, 1), "job_s": round(job_s, 1),
                      "index": res["extra"]["index"], "counts": res["counts"],
                      "driver_rss_growth_mb": round((rss.peak - rss.start) / 2**20, 1), **rec,
                      "duplicate_groups": res["extra"]["duplicate_groups"]}), flush=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
