"""The settings of jobs.neighbors (see its module doc), declared once; importing this needs neither torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline import vector_index
from pipeline.config import Section, setting
from pipeline.sections import JobSettings


@dataclass
class IndexSection(Section):
    kind: Literal["auto", "flat", "ivf", "hnsw"] = setting("auto", "auto: flat (exact) below exact_below vectors, "
                                                                   "else ivf")
    exact_below: int = setting(vector_index.EXACT_BELOW, "auto: exact search below this many vectors")
    nlist: int | None = setting(None, "ivf lists (null: 2 sqrt(n))")
    nprobe: int = setting(8, "ivf lists searched per query")
    build_cpus: float = setting(1, "CPUs of the index-building task (Ray's accounting)")
    threads: int = setting(0, "faiss threads in the build task and each search actor (0: every core of the node, "
                              "whatever Ray reserved: the index is the run's heavy work)")


@dataclass
class SearchSection(Section):
    batch_size: int = setting(4096, "queries per search call")
    concurrency: int | tuple[int, int] = setting(1, "search actors: a fixed number, or [min, max]")
    num_cpus: float = setting(1, "CPUs per search actor (Ray's accounting)")
    rows_per_part: int = setting(200_000, "table rows per Parquet data file")
    log_every_s: float = setting(30, "seconds between progress lines")


@dataclass
class Settings(JobSettings):
    input: str | None = setting(None, "dataset root with a committed latents (wplus) or embeddings (identity) table")
    output: str | None = setting(None, "where neighbors/, duplicate_groups/ and _runs/ go (default: input)")
    space: Literal["wplus", "identity"] = setting("wplus", "wplus: W+ averaged over layers, Euclidean; identity: "
                                                           "jobs.embed vectors, cosine distance")
    layers: tuple[int, int] | None = setting(None, "wplus: average layers [a, b) only (null: all)")
    k: int = setting(10, "neighbours per face")
    threshold: float | None = setting(None, "near-duplicate pairs: distance below this (null: wplus 0.02, measured "
                                            "on planted copies with the seeded tiny-32 model; identity: required)")
    index: IndexSection = setting(IndexSection, "the faiss index")
    search: SearchSection = setting(SearchSection, "the search actors")
