"""Secrets out of everything we write: URIs lose their userinfo and credential-bearing query
parameters before they reach run records, table rows, logs or the report.

    redact_uri / redact_text / redact_config   one value, free text, a nested config
    redact_table                               the string columns of rows about to be written
    install_log_redaction                      every log record of this process (the jobs' CLI
                                               and, through Ray's worker setup hook, the workers)
"""
from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.compute as pc

_SECRET_PARAM = re.compile(r"(sig|signature|token|credential|secret|password|key|auth|sas|x-amz-|x-goog-)", re.I)
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# A `name=value` parameter after ? & ; or # outside a full URI: a presigned URL's query kept by a
# file name (`ckpt.pt?X-Amz-Signature=...`) or a relative path.
_PARAM_IN_TEXT = re.compile(r"([?&;#])([^=&;#?\s'\"<>]+)=([^&;#\s'\"<>]*)")
# Rows whose strings may hold a secret (userinfo or a query); only those are parsed.
_MAYBE_SECRET = r"[@?&;#]"
REDACTED = "REDACTED"


def _redact_params(text: str) -> str:
    return _PARAM_IN_TEXT.sub(
        lambda m: f"{m.group(1)}{m.group(2)}={REDACTED}" if _SECRET_PARAM.search(m.group(2)) else m.group(0), text)


def redact_uri(uri):
    """`https://user:pw@host/p?X-Amz-Signature=..&v=1` -> `https://host/p?X-Amz-Signature=REDACTED&v=1`."""
    if not isinstance(uri, str):
        return uri
    if "://" not in uri:
        return _redact_params(uri)
    try:
        parts = urlsplit(uri)
    except ValueError:
        return REDACTED
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if _SECRET_PARAM.search(k) else v) for k, v in pairs], safe="/:")
    fragment = _redact_params("#" + parts.fragment)[1:] if parts.fragment else parts.fragment
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def redact_text(text: str) -> str:
    """Every URI inside free text (error messages) redacted, and secret parameters of a query
    left without its scheme."""
    if not isinstance(text, str):
        return text
    return _redact_params(_URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text))


def redact_config(value):
    """A config (nested dicts / lists) with every string URI redacted."""
    if isinstance(value, dict):
        return {k: redact_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_config(v) for v in value]
    return redact_text(value) if isinstance(value, str) else value


def redact_table(t: pa.Table) -> pa.Table:
    """`t` with every top-level string column redacted (only the values that could hold a secret
    are parsed, so clean columns cost one vectorised scan)."""
    for i, f in enumerate(t.schema):
        if not (pa.types.is_string(f.type) or pa.types.is_large_string(f.type)):
            continue
        col = t.column(i)
        hit = pc.match_substring_regex(col, _MAYBE_SECRET)
        if not pc.any(hit).as_py():
            continue
        vals = [redact_text(v) if h else v for v, h in zip(col.to_pylist(), hit.to_pylist())]
        t = t.set_column(i, f, pa.array(vals, type=f.type))
    return t


class _RedactingRecords:
    """A log record factory: the message (arguments merged) and the traceback are redacted when
    the record is made, so every handler, whenever added, sees only redacted text."""

    def __init__(self, make):
        self.make = make

    def __call__(self, *args, **kwargs) -> logging.LogRecord:
        record = self.make(*args, **kwargs)
        try:
            record.msg, record.args = redact_text(record.getMessage()), None
        except Exception:  # noqa: BLE001 - a badly formatted message is logging's to report
            return record
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return record


def install_log_redaction() -> None:
    """Redact every log record this process makes from now on (idempotent)."""
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _RedactingRecords):
        logging.setLogRecordFactory(_RedactingRecords(factory))
