"""The import rule of docs/architecture.md that import-linter cannot check (its contracts in
pyproject.toml check the layers and cycles, `lint-imports` in `make test`): no module of
bgqueue uses another module's private names (`_name`), by import or by attribute."""

from __future__ import annotations

import ast
from pathlib import Path

import bgqueue

PACKAGE = Path(bgqueue.__file__).parent


def private_uses(path: Path) -> list[str]:
    """`from bgqueue... import _name` and `module._name` for a bgqueue module bound by an
    import, in one source file."""
    tree = ast.parse(path.read_text(), str(path))
    modules: set[str] = set()  # local names bound to bgqueue modules or their members
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bgqueue"):
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("bgqueue"):
                    modules.add(alias.asname or alias.name.partition(".")[0])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
        ):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names() -> None:
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 40, "the package's sources are where this test looks"
    found = {
        str(path.relative_to(PACKAGE.parent)): uses
        for path in sources
        if (uses := private_uses(path))
    }
    assert found == {}, "make the name public where it is defined, or move the code to it"


def test_the_check_finds_both_forms(tmp_path: Path) -> None:
    """Not vacuous: an import of a private name and a private attribute of an imported
    module are both found."""
    source = tmp_path / "offender.py"
    source.write_text(
        "from bgqueue import works\n"
        "from bgqueue.transient import _hidden\n"
        "works._claim_and_publish(None, None, {})\n"
    )
    assert private_uses(source) == [
        "line 2: from bgqueue.transient import _hidden",
        "line 3: works._claim_and_publish",
    ]
