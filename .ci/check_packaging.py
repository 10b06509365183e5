"""Build the sdist and the wheel as a fresh install would, and fail on any deprecation warning
the build backend emits (`make test` runs this; tests/test_packaging.py checks it bites).

Why not grep pip's output: pip runs the backend in another process and shows its warnings
in a form that has changed between pip versions (plain stderr once, a re-raised
`BuildBackendWarning` now), so a pattern that matches today may silently match nothing
tomorrow. Why not `PYTHONWARNINGS=error::DeprecationWarning`: setuptools' deprecations are
`SetuptoolsDeprecationWarning`, a UserWarning, which that filter lets through (this is how
`project.license` as a TOML table went unnoticed).

So this script does what pip's build isolation does — a new directory with only
`build-system.requires` installed, newest versions as pip picks them — and calls the
backend's PEP 517 hooks itself, in a child Python that sees nothing else (`-S`: no
site-packages) and records every warning with its class. A warning fails the check when
its class says it is a deprecation addressed to the project being built, one a user
installing it sees: FutureWarning, or a backend's own `...DeprecationWarning` class
(setuptools' SetuptoolsDeprecationWarning), matched by class, not by wording. Python's
DeprecationWarning and PendingDeprecationWarning address the code that calls a deprecated
API, here the backend's own (setuptools 77 imports pkg_resources, say); Python hides them
by default and this project cannot fix them, so they are listed as notes, not failures.
The wheel is built from the unpacked sdist, as pip builds from an sdist, so a file the
sdist leaves out fails here too.

Usage: check_packaging.py [PROJECT_DIR]   (default: the repository this script is in)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Not part of a source tree: left out of the copy the sdist is built from.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", "*.pyc", "*_cache", ".hypothesis", "build", "dist",
    "*.egg-info", "results",
)  # fmt: skip

# Runs in the child: call one hook with every warning recorded, write them as JSON.
HOOK = r"""
import importlib, json, os, sys, warnings
env, source, out, backend_name, hook, report = sys.argv[1:7]
sys.path.insert(0, env)
os.chdir(source)
found = []
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    backend = importlib.import_module(backend_name)
    built = getattr(backend, hook)(out)
INTERNAL = (DeprecationWarning, PendingDeprecationWarning)
for w in caught:
    named = any(cls.__name__.endswith("DeprecationWarning") for cls in w.category.__mro__)
    internal = issubclass(w.category, INTERNAL)
    found.append({
        "category": w.category.__name__,
        "deprecation": not internal and (named or issubclass(w.category, FutureWarning)),
        "internal": internal,
        "message": str(w.message), "where": f"{w.filename}:{w.lineno}",
    })
with open(report, "w") as f:
    json.dump({"built": built, "warnings": found}, f)
"""


def build_system(project: Path) -> tuple[list[str], str]:
    """`build-system.requires` and `build-backend` (PEP 517's defaults when absent)."""
    config = tomllib.loads((project / "pyproject.toml").read_text())
    system = config.get("build-system", {})
    if "backend-path" in system:
        sys.exit("check_packaging: an in-tree backend (backend-path) is not supported")
    requires = system.get("requires", ["setuptools>=40.8.0"])
    return requires, system.get("build-backend", "setuptools.build_meta:__legacy__")


def run_hook(env: Path, source: Path, out: Path, backend: str, hook: str) -> dict[str, Any]:
    """One hook in a fresh child Python; its own output is shown only if it fails."""
    report = out / f"{hook}.json"
    done = subprocess.run(
        [sys.executable, "-S", "-c", HOOK, str(env), str(source), str(out), backend, hook,
         str(report)],
        capture_output=True,
        text=True,
    )  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"check_packaging: {hook} failed:\n{done.stdout}{done.stderr}")
    result: dict[str, Any] = json.loads(report.read_text())
    return result


def summary(warning: dict[str, Any]) -> str:
    """A recorded warning in one line: its class, its first line, where it was raised."""
    lines = [line.strip() for line in warning["message"].splitlines() if line.strip()]
    return f"{warning['category']}: {lines[0] if lines else ''} ({warning['where']})"


def check(project: Path) -> int:
    """0 when the sdist and the wheel build with no deprecation warning, else 1."""
    requires, backend = build_system(project)
    backend = backend.partition(":")[0]  # the `:object` suffix names the module's attribute
    with tempfile.TemporaryDirectory(prefix="check-packaging-") as tmp:
        env, source, out = Path(tmp, "env"), Path(tmp, "src"), Path(tmp, "dist")
        out.mkdir()
        installed = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--target", str(env), *requires],
        )  # fmt: skip
        if installed.returncode != 0:
            sys.exit(f"check_packaging: could not install build-system.requires {requires}")
        shutil.copytree(project, source, ignore=NOT_SOURCE)
        sdist = run_hook(env, source, out, backend, "build_sdist")
        with tarfile.open(out / str(sdist["built"])) as archive:
            # Our own archive; the "data" filter (Python 3.11.4+) only where it exists.
            safe: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(Path(tmp, "unpacked"), **safe)
        (unpacked,) = Path(tmp, "unpacked").iterdir()
        wheel = run_hook(env, unpacked, out, backend, "build_wheel")
        caught = [*sdist["warnings"], *wheel["warnings"]]
        for w in caught:
            if w["internal"]:
                print(f"packaging: note, inside the backend: {summary(w)}", file=sys.stderr)
        deprecations = [w for w in caught if w["deprecation"]]
        for w in deprecations:
            print(f"packaging: {summary(w)}", file=sys.stderr)
        if deprecations:
            print(
                f"packaging: {len(deprecations)} deprecation warning(s) building "
                f"{sdist['built']} and {wheel['built']}; fix them before they become errors",
                file=sys.stderr,
            )
            return 1
        print(f"packaging: {sdist['built']} and {wheel['built']} build with no deprecation")
        return 0


if __name__ == "__main__":
    sys.exit(check(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else REPO))
