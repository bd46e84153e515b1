"""Tables computed over a whole source table (neighbours, duplicate groups, quality): a run
records what it was computed from in its commit metadata, and the next run over the same
committed source version with the same settings has nothing to do."""
from __future__ import annotations

from pipeline import delta


def inputs_metadata(source_version: int, settings: str) -> dict[str, str]:
    """The commit metadata naming a run's inputs (`settings`: the job's canonical JSON)."""
    return {"source_version": str(int(source_version)), "settings": settings}


def up_to_date(output: str, table: str, source_version: int, settings: str,
               match: dict[str, str] | None = None) -> bool:
    """Whether the last commit of `table` (among those whose metadata has every item of `match`,
    such as the space) was computed from this source version with these settings."""
    try:
        hist = delta.commit_history(output, table)
    except FileNotFoundError:
        return False
    mine = [h for h in hist if all(h.get(k) == v for k, v in (match or {}).items())]
    want = inputs_metadata(source_version, settings)
    return bool(mine) and all(mine[-1].get(k) == v for k, v in want.items())
