"""The settings of jobs.neighbors (see its module doc), declared once; importing this needs
neither torch nor Ray."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline import vector_index
from pipeline.config import Section, setting
from pipeline.sections import JobSettings, concurrency_problems

# the ratio rule's default: planted copies measured at up to 0.39 x the 3rd-neighbour distance,
# distinct faces from 0.53 (crop space, README, Analytics); 0.45 sits between
DEFAULT_RATIO = 0.45


@dataclass
class IndexSection(Section):
    kind: Literal["auto", "flat", "ivf", "hnsw"] = setting("auto", "auto: flat (exact) below exact_below vectors, "
                                                                   "else ivf")
    exact_below: int = setting(vector_index.EXACT_BELOW, "auto: exact search below this many vectors", ge=0)
    nlist: int | None = setting(None, "ivf lists (null: 2 sqrt(n))", ge=1)
    nprobe: int = setting(vector_index.DEFAULT_NPROBE, "ivf lists searched per query", ge=1)
    build_cpus: float = setting(1, "CPUs of the index-building task (Ray's accounting)", ge=0)
    threads: int = setting(0, "faiss threads in the build task and each search actor (0: every core of the node, "
                              "whatever Ray reserved: the index is the run's heavy work)", ge=0)


@dataclass
class SearchSection(Section):
    batch_size: int = setting(4096, "queries per search call", ge=1)
    concurrency: int | tuple[int, int] = setting(1, "search actors: a fixed number, or [min, max]", ge=1)
    num_cpus: float = setting(1, "CPUs per search actor (Ray's accounting)", ge=0)
    rows_per_part: int = setting(200_000, "table rows per Parquet data file", ge=1)
    log_every_s: float = setting(30, "seconds between progress lines", gt=0)

    def problems(self) -> list[str]:
        return concurrency_problems(self.concurrency)


@dataclass
class Settings(JobSettings):
    input: str | None = setting(None, "dataset root with a committed latents (crop, wplus) or embeddings (identity) "
                                      "table")
    output: str | None = setting(None, "where neighbors/, duplicate_groups/ and _runs/ go (default: input)")
    space: Literal["crop", "wplus", "identity"] = setting("crop", "crop: 8x8 RGB thumbnail of each face's crop "
                                                                  "(aligned_uri), RMS pixel difference; wplus: W+ "
                                                                  "averaged over layers, Euclidean; identity: "
                                                                  "jobs.embed vectors, cosine distance")
    layers: tuple[int, int] | None = setting(None, "wplus: average layers [a, b) only (null: all)", ge=0)
    k: int = setting(10, "neighbours per face (the ratio rule needs 3)", ge=1)
    threshold: float | None = setting(None, "near-duplicate pairs: distance below this absolute value (null: the "
                                            "ratio rule)", ge=0)
    ratio: float = setting(DEFAULT_RATIO, "with threshold null: pairs closer than ratio x the distance from each "
                                          "of the two faces to its 3rd nearest neighbour", gt=0, lt=1)
    index: IndexSection = setting(IndexSection, "the faiss index")
    search: SearchSection = setting(SearchSection, "the search actors")

    def problems(self) -> list[str]:
        out = super().problems()
        if self.layers is not None and self.layers[1] <= self.layers[0]:
            out.append(f"layers: must be [a, b) with a < b, got {list(self.layers)}")
        if self.layers is not None and self.space != "wplus":
            out.append(f"layers: only the wplus space averages layers (space is {self.space})")
        if self.threshold is None and self.k < 3:
            out.append(f"k: the ratio rule (threshold null) compares with the 3rd neighbour: needs k >= 3, "
                       f"got {self.k}")
        return out
