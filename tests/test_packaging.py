"""Packaging that keeps building: the license is an SPDX expression with its file, and the
check `make test` runs (.ci/check_packaging.py) fails on a deprecated form."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / ".ci" / "check_packaging.py"


def test_license_is_an_spdx_expression_with_its_license_file() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = config["project"]
    assert project["license"] == "Apache-2.0", "an SPDX string, not a TOML table"
    assert project["license-files"] == ["LICENSE"]
    assert "Apache License" in (REPO / "LICENSE").read_text()
    assert not any(c.startswith("License ::") for c in project.get("classifiers", [])), (
        "PEP 639: the expression replaces license classifiers"
    )
    (setuptools,) = [r for r in config["build-system"]["requires"] if r.startswith("setuptools")]
    floor = re.fullmatch(r"setuptools>=(\d+)\.(\d+)\.(\d+)", setuptools)
    assert floor and tuple(map(int, floor.groups())) >= (77, 0, 1), "PEP 639 needs setuptools 77"


def test_packaging_check_fails_on_the_deprecated_license_table(tmp_path: Path) -> None:
    """The check is not vacuous: the same project with `license = { text = ... }` (setuptools
    has deprecated it, to fail from 2027-02-18) makes it exit non-zero, naming the form."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, project / name)
    shutil.copytree(REPO / "bgqueue", project / "bgqueue", ignore=shutil.ignore_patterns("__py*"))
    pyproject = project / "pyproject.toml"
    spdx = 'license = "Apache-2.0"\nlicense-files = ["LICENSE"]\n'
    text = pyproject.read_text()
    assert spdx in text
    pyproject.write_text(text.replace(spdx, 'license = { text = "Apache-2.0" }\n'))
    done = subprocess.run(
        [sys.executable, str(CHECK), str(project)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stdout + done.stderr
    # Today a SetuptoolsDeprecationWarning; once setuptools makes it an error, a failed build.
    assert "`project.license` as a TOML table" in done.stderr, done.stderr
