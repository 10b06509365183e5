"""`python -m bgqueue` is the `bgqueue` command."""

from bgqueue.cli import run

run()
