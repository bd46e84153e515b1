"""jobs.embed's settings checks (the job itself runs in tests/test_analytics.py)."""
from __future__ import annotations

import pytest

from jobs import embed
from pipeline.config import SettingsError, parse
from pipeline.errors import JobError


def test_embed_needs_a_backbone_and_an_input_before_ray_starts(tmp_path):
    missing = parse(embed.SETTINGS, {"input": str(tmp_path / "nothing")})
    errors = embed.check(missing)
    assert [m.split(":")[0] for m in errors] == ["metric_weights.facenet", "input"]
    assert "allow_random_init is for tests" in errors[0]
    assert embed.check(parse(embed.SETTINGS, {"input": str(tmp_path), "metric_weights": {"facenet": "w.pt"}})) == []
    with pytest.raises(JobError, match="metric_weights.facenet"):
        embed.run(missing)
    with pytest.raises(SettingsError) as e:
        parse(embed.SETTINGS, {"crop_size": 0, "embed": {"batch_size": 0}})
    assert sorted(m.split(":")[0] for m in e.value.errors) == ["crop_size", "embed.batch_size"]
