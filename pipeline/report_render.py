"""The report's templates (`pipeline/report_templates/`) on Jinja2, autoescaped.

Every value a template prints goes through `finalize`: text has the secrets of any URI in it
redacted (`pipeline.redact`), then autoescape escapes it. Two kinds of values pass untouched:
markup this project built (charts' SVG, whose own text is escaped and redacted where it is made,
and rendered macros), and the embedded images' `DataURI`s, which are the page's own data; a
redaction of their base64 text would break them.
"""
from __future__ import annotations

import functools

import jinja2
from markupsafe import Markup

from pipeline.redact import redact_text
from pipeline.report_format import fmt
from pipeline.report_images import DataURI


def finalize(value):
    """What `{{ value }}` prints, before escaping."""
    if value is None:
        return ""
    if isinstance(value, (Markup, DataURI)):
        return value
    return redact_text(str(value))


def _svg(chart) -> Markup:
    return chart.svg()


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline", "report_templates"), autoescape=True,
                             finalize=finalize, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters["num"] = fmt
    env.filters["svg"] = _svg
    return env


def render(template: str, **context) -> str:
    return environment().get_template(template).render(**context)
