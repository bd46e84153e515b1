"""The errors a job raises instead of ending the process; the CLI (jobs.cli.main) turns them
into exit codes, a Python caller catches them."""
from __future__ import annotations


class JobError(Exception):
    """A job cannot do what its (valid) settings ask: a table it reads is not committed, there
    is nothing to fit... The CLI prints the message (redacted) and exits with status 1; nothing
    was committed."""
