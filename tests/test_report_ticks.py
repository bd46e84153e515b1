"""Report chart tick labels: distinct even when the values are nearly equal (issue 11, point 3:
det_score values 0.9997-1.0 labelled every histogram tick "1")."""
from __future__ import annotations

import re

import numpy as np

from pipeline.report_charts import _tick_labels, _ticks, count_ticks, svg_bar_chart, svg_histogram, svg_line_chart

X_TICK = re.compile(r'text-anchor="middle" font-size="10">([^<]*)</text>')
Y_TICK = re.compile(r'text-anchor="end" font-size="10">([^<]*)</text>')


def check(labels: list[str], lo: float, hi: float) -> None:
    assert len(labels) >= 3, labels
    assert len(set(labels)) == len(labels), labels
    vals = [float(v) for v in labels]
    assert all(a < b for a, b in zip(vals, vals[1:])), labels
    assert lo - 1e-12 <= vals[0] and vals[-1] <= hi + 1e-12, labels


def test_histogram_of_nearly_equal_scores_has_distinct_ticks():
    v = np.linspace(0.9997, 1.0, 50)
    labels = X_TICK.findall(svg_histogram(v, "det_score"))
    check(labels, 0.9997, 1.0)
    assert "0.9998" in labels and "1" in labels                # no more digits than needed


def test_line_and_bar_charts_of_nearly_equal_values():
    xs = [1000.0, 1000.1, 1000.2, 1000.3, 1000.4]
    svg = svg_line_chart({"a": (xs, [0.12345, 0.12346, 0.12347, 0.12348, 0.12349])}, "t")
    check(X_TICK.findall(svg), 1000.0, 1000.4)
    check(Y_TICK.findall(svg), 0.12345, 0.12349)
    bars = svg_bar_chart([5.0001, 5.0002, 5.0003], ["a", "b", "c"], "t")
    labels = Y_TICK.findall(bars)
    assert len(set(labels)) == len(labels) >= 3, labels


def test_ordinary_ranges_keep_short_labels():
    assert _tick_labels(_ticks(0, 100, 4)) == ["0", "25", "50", "75", "100"]
    assert _tick_labels(_ticks(0.1, 0.9, 4)) == ["0.2", "0.4", "0.6", "0.8"]
    assert X_TICK.findall(svg_histogram([1, 2, 3, 4, 5], "h")) == ["1", "2", "3", "4", "5"]
    assert _tick_labels([2.0]) == ["2"]


def test_count_axes_have_distinct_integer_ticks():
    """Issue 20: a det_score histogram whose tallest bar is 1 read "1, 0, 0" on its y axis (ticks
    at 0, 0.5, 1 printed as integers)."""
    for cmax in range(1, 200):
        ticks = count_ticks(cmax)
        assert ticks[0] == 0 and ticks[-1] >= cmax and len(set(ticks)) == len(ticks) >= 2, (cmax, ticks)
        assert all(isinstance(t, int) for t in ticks) and len(ticks) <= 5, (cmax, ticks)
    for counts in ([0.9], [0.9, 0.91], [0.9, 0.9, 0.95], list(np.linspace(0, 1, 7))):
        labels = Y_TICK.findall(svg_histogram(counts, "det_score"))
        assert len(set(labels)) == len(labels) >= 2 and all(v.isdigit() for v in labels), (counts, labels)
