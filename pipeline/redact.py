"""Secrets out of everything we write: URIs lose their userinfo and credential-bearing query
parameters before they reach run records, table rows, logs or the report."""
from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_SECRET_PARAM = re.compile(r"(sig|signature|token|credential|secret|password|key|auth|sas|x-amz-|x-goog-)", re.I)
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
REDACTED = "REDACTED"


def redact_uri(uri):
    """`https://user:pw@host/p?X-Amz-Signature=..&v=1` -> `https://host/p?X-Amz-Signature=REDACTED&v=1`."""
    if not isinstance(uri, str) or "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return REDACTED
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if _SECRET_PARAM.search(k) else v) for k, v in pairs], safe="/:")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URI inside free text (error messages) redacted."""
    return _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text) if isinstance(text, str) else text


def redact_config(value):
    """A config (nested dicts / lists) with every string URI redacted."""
    if isinstance(value, dict):
        return {k: redact_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_config(v) for v in value]
    return redact_text(value) if isinstance(value, str) else value
