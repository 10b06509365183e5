"""Hypothesis over the CLI's flags: a bad flag or value gets one `error:` (or click usage)
line on stderr and a non-zero exit, never a traceback, and nothing is written to Redis."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bgqueue.ops.cli import run
from tests.harness import REPO, SAMPLE_APP
from tests.test_scheduler import snapshot

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
junk = st.one_of(
    st.text(max_size=12).filter(lambda t: "\x00" not in t),
    st.sampled_from(["-1", "nan", "inf", "1e400", "{", "[1,", "\u00e9", "#x", "a b", ""]),
)
COMMANDS = [
    ["submit", "com.bgqueue.test.a"],
    ["pending"],
    ["cancel"],
    ["simulate", "launch"],
    ["simulate", "expire"],
]
FLAGS = ["--kind", "--in", "--payload", "--protection", "--strategy", "--scope", "--title", "--all"]


def invoke(argv: list[str]) -> tuple[int, str]:
    """Run the `bgqueue` entry point in this process; (exit code, stderr)."""
    err = io.StringIO()
    old = sys.argv
    sys.argv = ["bgqueue", *argv]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                run()
                code = 0
            except SystemExit as exc:
                code = int(exc.code or 0) if not isinstance(exc.code, str) else 1
    finally:
        sys.argv = old
    return code, err.getvalue()


@FUZZ
@given(
    command=st.sampled_from(COMMANDS),
    flags=st.lists(st.tuples(st.sampled_from(FLAGS), junk), max_size=3),
    extra=st.lists(junk, max_size=2),
)
def test_bad_flags_get_one_line_and_write_nothing(
    redis_url: str, redis_client: redis.Redis, command: list[str], flags: Any, extra: list[str]
) -> None:
    before = snapshot(redis_client)
    argv = [*command[:1], "--app", SAMPLE_APP, "--broker", redis_url, *command[1:]]
    for flag, value in flags:
        argv += [flag] if flag == "--all" else [flag, value]
    code, err = invoke(argv + extra)
    assert "Traceback" not in err
    if code == 0:
        return  # a valid combination: accepted (tested elsewhere)
    # One error line (click's usage errors add a usage hint above it; an argument with a
    # control character in it is echoed as it is, so the check looks at every line).
    assert any(line.startswith(("error:", "Error:")) for line in err.splitlines()), err
    assert snapshot(redis_client) == before


@pytest.mark.parametrize(
    "argv",
    [
        ["worker", "--app", SAMPLE_APP, "--concurrency", "0"],
        ["worker", "--app", SAMPLE_APP, "--condition", "nonsense"],
        ["worker", "--app", SAMPLE_APP, "--condition", "battery_level=101"],
        ["worker", "--app", "no.such.module:app"],
        ["beat", "--metrics-port", "70000"],
        ["status", "--broker", "redis://127.0.0.1:1/0"],
        ["submit", "--app", SAMPLE_APP, "com.bgqueue.test.a", "--payload", "{"],
    ],
)
def test_bad_flags_in_a_real_process(redis_url: str, argv: list[str]) -> None:
    """The installed entry point in its own process: one line, non-zero, no traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "bgqueue", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "BGQUEUE_BROKER_URL": redis_url},
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].lower().startswith("error:"), done.stderr
