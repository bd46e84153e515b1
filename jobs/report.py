"""Report job: one self-contained HTML page about a dataset root written by this project's jobs.

    python -m jobs.report --set input=URI [--set output=URI] [--set report.max_images=32]

Reads what exists under `input`: the committed snapshot of every Delta table (`faces`,
`latents`, `metrics`, `edits`, ...; files of uncommitted runs are never read), the job runs from
the Delta log checked against the `_runs/<run_id>.json` records (a record without a commit is
flagged, not counted), and `train/log.jsonl`, `train/grids/*.png`, `train/eval.json`. Writes
`<output or input>/report/index.html`: a job table with counts, timings and table versions
(accounting mismatches flagged), face-alignment status and crops, input | reconstruction pairs,
metric histograms, the per-layer W+ norm, edit grids and an attribute x kind summary, training
loss curves and grids. Images are embedded as downscaled data: URIs and charts as inline SVG, so
the one file opens offline. Parts that are absent are named as missing; unreadable parts are
reported in the page, never a crash.

The driver reads only the scalar columns each section shows and a bounded number of rows and
images; the W+ norms come from the first `report.max_wplus_rows` codes, streamed, or with
`report.max_wplus_rows=null` from every code in Ray Data (the only part that starts Ray).
The page: `pipeline/report_page.py` (sections gathered as data in `pipeline/report_sections.py`, rendered
with the Jinja2 templates in `pipeline/report_templates/`).

Counts are per report part (jobs, faces, latents, metrics, edits, training): ok = built,
skipped = absent from the dataset, failed = could not be built (shown as an error in its
place); the summary's `runs` is the number of committed runs read.
"""
from __future__ import annotations

import logging
import sys
import time

from jobs.cli import init_ray, main
from jobs.settings.report import Settings
from pipeline import report_page, report_sections, storage
from pipeline.errors import JobError

log = logging.getLogger("stbatch.report")

JOB = "report"

SETTINGS = Settings
NO_INPUT = "input: set input=URI (a dataset root written by the project's jobs)"


def check(cfg: Settings) -> list[str]:
    """Before anything runs: an input root is named (a root that does not exist yet is reported
    as empty, not refused)."""
    return [] if cfg.input else [NO_INPUT]


def run(cfg: Settings) -> dict:
    if not cfg.input:
        raise JobError(NO_INPUT)
    t0 = time.time()
    root = cfg.input.rstrip("/") or cfg.input
    html_text, info = report_page.build_report(root, cfg.report, start_ray=lambda: init_ray(cfg))
    uri = storage.join(cfg.output or root, "report", "index.html")
    storage.write_bytes(uri, html_text.encode("utf-8"))
    log.info("report: %d runs, %d sections, %d images embedded, %.1f KiB, %.1fs", info["runs"],
             info["sections"], info["images"], len(html_text) / 1024, time.time() - t0)
    print(f"report written to {uri}", file=sys.stderr, flush=True)
    # Counted per report part (jobs, faces, latents, metrics, edits, training), so the shared
    # accounting rule in = ok + failed + skipped holds: ok = built, failed = could not be built,
    # skipped = absent from the dataset. The number of committed runs read is `runs`.
    counts = {"in": len(report_sections.SECTIONS), "ok": info["sections"], "failed": info["failed"],
              "skipped": info["missing"]}
    return {"run_id": None, "counts": counts,
            "extra": {"report": uri, "runs": info["runs"], "images": info["images"],
                      "missing_images": info["missing_images"]}}


if __name__ == "__main__":
    main(JOB, __doc__, SETTINGS, run, use_ray=False, check=check)
