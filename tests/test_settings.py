"""Typed settings: every config file against the jobs, unknown keys, wrong types, choices, and the
CLI stopping before it touches anything. Fast: no Ray."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from jobs.cli import load_config
from jobs.settings import CONFIG_JOBS
from pipeline.config import SettingsError, as_dict, defaults, describe, parse, setting
from pipeline.sections import ActorSection, JobSettings

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# what each file is written for, and one value per job that must come from it
CONFIG_FOR = {
    "cars.yaml": {"invert": ("invert.batch_size", 32), "evaluate": ("model.preset", "cars-512"),
                  "edit": ("model.name", "style-transformer-cars-512")},
    "ffhq.yaml": {"align": ("align.concurrency", (2, 16)), "invert": ("invert.load_batch_size", 64),
                  "evaluate": ("evaluate.batch_size", 16), "edit": ("model.name", "style-transformer-ffhq-1024"),
                  "train_encoder": ("train_encoder.steps", 500000)},
    "local.yaml": {"align": ("align.size", 256), "invert": ("invert.batch_size", 8),
                   "evaluate": ("metric_weights.skip_missing", True)},
    "tiny.yaml": {"align": ("align.size", 64), "invert": ("invert.batch_size", 4),
                  "evaluate": ("model.preset", "tiny-32")},
}


def _settings(job: str) -> type:
    return importlib.import_module(f"jobs.{job}").SETTINGS


def _get(cfg, dotted: str):
    for p in dotted.split("."):
        cfg = getattr(cfg, p)
    return cfg


def _errors(settings: type, sets: list[str], config: str | None = None) -> list[str]:
    with pytest.raises(SettingsError) as e:
        load_config(settings, config, sets)
    return e.value.errors


@pytest.mark.parametrize("job", CONFIG_JOBS)
def test_defaults_are_valid_settings(job):
    cls = _settings(job)
    assert parse(cls, as_dict(defaults(cls))) == defaults(cls)


def test_every_config_file_is_declared():
    assert sorted(p.name for p in CONFIGS) == sorted(CONFIG_FOR)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("job", CONFIG_JOBS)
def test_config_file_loads_for_every_job(path, job):
    """Every file loads for every job (other jobs' sections are ignored), and the jobs it is
    written for get its values."""
    cfg = load_config(_settings(job), str(path), [])
    if job in CONFIG_FOR[path.name]:
        key, want = CONFIG_FOR[path.name][job]
        assert _get(cfg, key) == want


def test_training_jobs_have_their_own_sections():
    """ffhq.yaml's encoder training settings reach train_encoder only."""
    ffhq = str(ROOT / "configs" / "ffhq.yaml")
    assert load_config(_settings("train_encoder"), ffhq, []).train_encoder.batch_size == 8
    assert load_config(_settings("fit_editor"), ffhq, []).fit_editor.batch_size == 64
    assert load_config(_settings("fit_classifier"), ffhq, []).fit_classifier.batch_size == 256
    errs = _errors(_settings("train_encoder"), ["train.steps=3"])
    assert errs == ["train: unknown setting (did you mean train_encoder?)"]


def test_config_file_unknown_key_is_an_error_with_suggestion(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("invert:\n  batch_sise: 4\nalign:\n  size: 64\ntrain:\n  steps: 3\n")
    errs = _errors(_settings("align"), [], str(f))
    assert any("invert.batch_sise" in e and "invert.batch_size" in e for e in errs), errs
    assert any(e.endswith("train: unknown setting (did you mean train_encoder?)") for e in errs), errs


def test_unknown_set_key_names_it_and_suggests():
    errs = _errors(_settings("invert"), ["invert.batch_sise=64", "invert.max_pixel=1000", "bogus=1"])
    assert "invert.batch_sise: unknown setting (did you mean invert.batch_size?)" in errs
    assert "invert.max_pixel: unknown setting (did you mean invert.max_pixels?)" in errs
    assert "bogus: unknown setting" in errs


def test_set_must_name_this_jobs_setting():
    # align does not know invert's section: a config file may carry it, --set may not
    errs = _errors(_settings("align"), ["invert.batch_size=4"])
    assert errs == ["invert: unknown setting"]


def test_wrong_types_name_key_value_and_type_all_together():
    errs = _errors(_settings("invert"), ["metrics=ture", "invert.batch_size=abc", "invert.num_cpus=[1,2]",
                                         "invert.concurrency=[1,2,3]", "invert.amp=bf17", "metrics=1",
                                         "invert.load_batch_size=[4]"])
    # the last --set of a key wins: metrics=1 (an int is not a bool)
    assert "metrics: expected bool (true or false), got 1 (int)" in errs
    assert "invert.batch_size: expected int, got 'abc' (str)" in errs
    assert "invert.num_cpus: expected number, got [1, 2] (list)" in errs
    assert "invert.concurrency: expected int or [int, int], got [1, 2, 3] (list)" in errs
    assert any(e.startswith("invert.amp: expected one of auto, none, bf16, fp16, got 'bf17'") for e in errs)
    assert "invert.load_batch_size: expected int, got [4] (list)" in errs
    assert len(errs) == 6


def test_bool_is_strict_and_numbers_convert():
    errs = _errors(_settings("invert"), ["metrics=ture"])
    assert errs == ["metrics: expected bool (true or false), got 'ture' (str)"]
    cfg = load_config(_settings("invert"), None, ["metrics=true", "invert.num_cpus=2", "invert.concurrency=[1,4]"])
    assert cfg.metrics is True and cfg.invert.num_cpus == 2.0 and cfg.invert.concurrency == (1, 4)
    assert isinstance(cfg.invert.num_cpus, float)


def test_section_given_a_value_and_value_given_a_section():
    errs = _errors(_settings("invert"), ["invert=3", "output.x=1"])
    assert "invert: expected a section (mapping), got 3 (int)" in errs
    assert "output: expected string or null, got {'x': 1} (dict)" in errs


@pytest.mark.parametrize("sets", [["paste_back=true", "paste_back.group=photo"],
                                  ["paste_back.group=photo", "paste_back=true"]])
def test_switch_then_its_keys_in_either_order(sets):
    cfg = load_config(_settings("edit"), None, sets)
    assert cfg.paste_back.group == "photo" and cfg.paste_back.enabled is True
    off = load_config(_settings("edit"), None, [*sets, "paste_back=false"])
    assert off.paste_back.enabled is False and off.paste_back.group == "photo"
    assert load_config(_settings("edit"), None, []).paste_back.enabled is False


@dataclass
class Inner(ActorSection):
    mode: Literal["a", "b"] = setting("a", "a mode")
    enabled: bool = setting(True, "on when given")
    lo: float = setting(0.0, "low end", ge=0)
    hi: float = setting(1.0, "high end", le=10)

    def problems(self) -> list[str]:
        return super().problems() + ([f"lo: must be below hi ({self.hi}), got {self.lo}"] if self.lo >= self.hi else [])


@dataclass
class S(JobSettings):
    names: list[str] = setting([], "some names")
    pairs: dict[str, str] = setting({}, "name -> uri")
    inner: Inner = setting(Inner, "a section")
    switch: Inner = setting(Inner, "off, on with the defaults, or a section", switch=True)


def test_schema_framework_types():
    out = parse(S, {"names": ["x"], "pairs": {"k": "v"}, "inner": {"mode": "b", "num_gpus": 0}})
    assert isinstance(out, S) and isinstance(out.inner, Inner)
    assert out.names == ["x"] and out.pairs == {"k": "v"}
    assert out.inner.mode == "b" and out.inner.num_gpus == 0.0 and out.inner.batch_size == 8
    assert defaults(S).names == [] and defaults(S).names is not defaults(S).names
    with pytest.raises(SettingsError) as e:
        parse(S, {"names": ["x", 3], "pairs": {"k": 1}, "inner": {"mode": True}})
    assert sorted(e.value.errors) == sorted([
        "names: expected list of string, got ['x', 3] (list)",
        "pairs: expected mapping of name to string, got {'k': 1} (dict)",
        "inner.mode: expected one of a, b, got True (bool)"])
    assert parse(S, {"switch": True}).switch == Inner(enabled=True) and defaults(S).switch.enabled is False
    assert parse(S, {"switch": {"mode": "b"}}).switch == Inner(mode="b", enabled=True)
    with pytest.raises(SettingsError) as e:
        parse(S, {"switch": {"mode": "c", "batch_sise": 2}})
    assert e.value.errors == ["switch.batch_sise: unknown setting (did you mean switch.batch_size?)",
                              "switch.mode: expected one of a, b, got 'c' (str)"]
    text = describe(S)
    assert "switch = false" in text and "switch.mode = a" in text
    assert "inner.mode = a" in text and "a mode [one of a, b]" in text
    assert "low end [number, >= 0]" in text and "actors: a fixed number" in text


def test_ranges_and_rules_between_settings():
    """A value out of its range names the key, the range and the value; a section's own rules
    run once its values are valid, under the section's path; every problem at once."""
    with pytest.raises(SettingsError) as e:
        parse(S, {"inner": {"lo": -1, "hi": 11, "batch_size": 0, "concurrency": [0, 2]}})
    assert sorted(e.value.errors) == sorted([
        "inner.lo: must be >= 0, got -1.0", "inner.hi: must be <= 10, got 11.0",
        "inner.batch_size: must be >= 1, got 0", "inner.concurrency: must be >= 1, got (0, 2)"])
    with pytest.raises(SettingsError) as e:
        parse(S, {"inner": {"lo": 5, "hi": 2, "concurrency": [4, 2]}, "switch": {"lo": 3, "hi": 3}})
    assert sorted(e.value.errors) == sorted([
        "inner.concurrency: [min, max] needs min <= max, got [4, 2]", "inner.lo: must be below hi (2.0), got 5.0",
        "switch.lo: must be below hi (3.0), got 3.0"])
    with pytest.raises(SettingsError) as e:
        parse(S, {"inner": {"lo": float("nan")}})
    assert e.value.errors == ["inner.lo: must be >= 0, got nan"]


def test_shared_ranges_reach_every_job():
    errs = _errors(_settings("edit"), ["paste_back.quality=0", "paste_back.radii=[0.8, 1.5]", "ray.spill_disk_limit=0"])
    assert sorted(errs) == sorted(["paste_back.quality: must be >= 1, <= 100, got 0",
                                   "paste_back.radii: must be > 0, <= 1, got (0.8, 1.5)",
                                   "ray.spill_disk_limit: must be > 0, <= 1, got 0.0"])
    assert "JPEG quality [int, >= 1, <= 100]" in describe(_settings("edit"))


def test_validating_a_shared_config_imports_neither_torch_nor_ray():
    code = ("import sys; from jobs.cli import load_config; from jobs.settings import SETTINGS\n"
            "for job, cls in SETTINGS.items(): load_config(cls, 'configs/ffhq.yaml', [])\n"
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0 and p.stdout.strip() == "[]", (p.stdout, p.stderr[-2000:])


def _cli(job: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", f"jobs.{job}", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("bad, named", [("invert.batch_sise=64", "invert.batch_sise"),
                                        ("metrics=ture", "metrics")])
def test_cli_stops_before_touching_the_output(tmp_path, bad, named):
    out = tmp_path / "out"
    inp = tmp_path / "in"
    inp.mkdir()
    p = _cli("invert", "--config", str(ROOT / "configs" / "tiny.yaml"), "--set", f"input={inp}",
             "--set", f"output={out}", "--set", bad, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert named in p.stderr and "invalid settings" in p.stderr
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["in"]
    assert p.stdout == ""


def test_cli_help_lists_nested_settings_with_meaning(tmp_path):
    p = _cli("align", "--help", cwd=tmp_path)
    assert p.returncode == 0
    line = next(ln for ln in p.stdout.splitlines() if ln.strip().startswith("align.face_policy = largest"))
    assert "align the largest face, or all of them" in line
    assert "ray.address = null" in p.stdout


@pytest.mark.parametrize("job, sets, expected", [
    ("invert", [], False),                      # a Ray Data job: no dashboard on a local Ray
    ("fit_classifier", [], True),               # Ray Train watches its runs through it
    ("demo", [], True),
    ("invert", ["ray.dashboard=true"], True),
    ("train_encoder", ["ray.dashboard=false"], False),
])
def test_local_ray_dashboard_only_for_the_jobs_that_train(monkeypatch, job, sets, expected):
    import ray

    from jobs import cli

    seen = {}
    monkeypatch.setattr(cli, "install_log_redaction", lambda: None)  # (process-wide, tested elsewhere)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    mod = importlib.import_module(f"jobs.{job}")
    trains = "trains=True" in (ROOT / "jobs" / f"{job}.py").read_text()
    # (--quiet: init_ray sets the process's Ray Data progress bars from `progress`)
    cli.main(job, "", mod.SETTINGS, lambda cfg: {"run_id": None, "counts": {}},
             argv=["--quiet", *(f"--set={s}" for s in sets)], trains=trains)
    assert seen["address"] == "local" and seen["include_dashboard"] is expected


def test_a_cluster_keeps_its_own_dashboard(monkeypatch):
    import ray

    from jobs.cli import init_ray

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    init_ray(load_config(_settings("invert"), None, ["ray.address=auto", "ray.dashboard=true",
                                                                "progress=false"]))
    assert seen["address"] == "auto" and "include_dashboard" not in seen
