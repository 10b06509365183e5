"""`python -m bgqueue` is the `bgqueue` command."""

from bgqueue.ops.cli import run

run()
