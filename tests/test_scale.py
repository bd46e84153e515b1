"""The driver does not hold the dataset: its allocations during a run do not grow with the
number of faces (a small version of `python -m bench.scale`, measured with tracemalloc for the
Python heap and pyarrow's allocator for Arrow buffers, which are steadier than RSS)."""
from __future__ import annotations

import threading
import time
import tracemalloc

import pyarrow as pa
import pytest

from bench.scale import write_crops
from jobs import evaluate, invert
from jobs.cli import load_config

BOUND = 512  # bytes per face


class DriverAllocations:
    def __enter__(self):
        self.arrow_start = pa.total_allocated_bytes()
        self.arrow_peak = self.arrow_start
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._sample, daemon=True)
        tracemalloc.start()
        tracemalloc.reset_peak()
        self.py_start = tracemalloc.get_traced_memory()[0]
        self._t.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.arrow_peak = max(self.arrow_peak, pa.total_allocated_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.py_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        self.growth = (self.py_peak - self.py_start) + (self.arrow_peak - self.arrow_start)


def _run(job, tmp_path, name, n):
    crops, out = str(tmp_path / f"c_{name}"), str(tmp_path / f"ds_{name}")
    write_crops(crops, n, seed=n)
    model = ["model.preset=tiny-32", "progress=false"]
    icfg = load_config(invert.SETTINGS, None, [f"input={crops}", f"output={out}", *model,
                                               "invert.batch_size=64", "invert.load_batch_size=64"])
    ecfg = load_config(evaluate.SETTINGS, None, [f"input={out}", *model, "metric_weights.skip_missing=true",
                                                 "evaluate.batch_size=64", "evaluate.load_batch_size=64"])
    if job == "evaluate":
        invert.run(icfg)
    with DriverAllocations() as m:
        res = (invert.run(icfg) if job == "invert" else evaluate.run(ecfg))
    assert res["counts"]["ok"] == n
    return m.growth


@pytest.mark.slow
@pytest.mark.parametrize("job", ["invert", "evaluate"])
def test_driver_allocations_do_not_grow_with_faces(ray_local, tmp_path, job):
    _run(job, tmp_path, "warm", 32)
    small = _run(job, tmp_path, "small", 64)
    large = _run(job, tmp_path, "large", 704)
    per_face = (large - small) / (704 - 64)
    assert per_face < BOUND, f"driver grew {per_face:.0f} bytes per face ({small} -> {large} bytes)"
