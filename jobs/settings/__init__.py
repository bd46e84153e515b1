"""Every job's settings class, by job name: what `--help` describes and a shared config file is
checked against. One module per job; importing them needs neither torch nor Ray."""
from __future__ import annotations

import importlib

# The jobs whose settings a shared config file may hold (the demo runs the others itself).
CONFIG_JOBS = ("align", "invert", "evaluate", "edit", "fit_classifier", "fit_editor", "train_encoder", "report",
               "maintain", "score", "embed", "neighbors", "quality", "fit_directions")

SETTINGS: dict[str, type] = {job: importlib.import_module(f"jobs.settings.{job}").Settings for job in CONFIG_JOBS}
