"""docs/architecture.md cannot drift: its package map is generated from the modules' docstrings
and checked here, the import graph flows one way (no module imports a later stage), and every
module stays small.

Regenerate the map after adding a module: ``python -m tests.unit.test_architecture``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
PKG = ROOT / "radmark"
DOC = ROOT / "docs" / "architecture.md"
BEGIN, END = "<!-- package map: generated -->", "<!-- end of package map -->"
#: The data flow, earliest stage first: a module may import its own stage or an earlier one.
STAGES = ["", "keys", "data", "models", "marking", "verify", "report", "cli"]
LATE = {"radmark.demo": "cli", "radmark.__main__": "cli"}
MAX_LINES, MAX_CLI_LINES = 450, 400


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _stage(module: str) -> int:
    if module in LATE:
        return STAGES.index(LATE[module])
    parts = module.split(".")
    return STAGES.index(parts[1]) if len(parts) > 1 and parts[1] in STAGES[1:] else 0


def package_map() -> str:
    rows = ["| module | what it holds |", "| --- | --- |"]
    for path in _modules():
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        first = " ".join(doc.split("\n\n")[0].split())
        rows.append(f"| `{path.relative_to(ROOT)}` | {first} |")
    return "\n".join(rows)


def _doc_map() -> str:
    text = DOC.read_text()
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()


def test_architecture_doc_lists_every_module() -> None:
    assert _doc_map() == package_map(), "run: python -m tests.unit.test_architecture"


def test_imports_flow_one_way() -> None:
    """Nothing imports a later stage (TYPE_CHECKING imports are type hints, not dependencies)."""
    bad = []
    for path in _modules():
        me = _name(path)
        tree = ast.parse(path.read_text())
        skip: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            if node.module.startswith("radmark") and _stage(node.module) > _stage(me):
                bad.append(f"{me} imports {node.module}")
    assert not bad, bad


def test_modules_are_small() -> None:
    for path in _modules():
        n = len(path.read_text().splitlines())
        limit = MAX_CLI_LINES if "cli" in path.parts else MAX_LINES
        assert n <= limit, f"{path.relative_to(ROOT)} has {n} lines (at most {limit})"


if __name__ == "__main__":
    text = DOC.read_text()
    new = (
        text[: text.index(BEGIN) + len(BEGIN)]
        + "\n"
        + package_map()
        + "\n"
        + text[text.index(END) :]
    )
    DOC.write_text(new)
    sys.stdout.write(f"rewrote the package map in {DOC}\n")


def test_no_two_names_differ_by_a_suffix() -> None:
    """Modules and packages are named for what they hold, and no name is another plus a suffix
    (issue #13 found mark / marking / marker and keys / keystore / keyops): a reader who sees one
    name never has to guess which of two near-synonyms holds the code."""
    names = {p.stem for p in _modules() if p.stem not in ("__init__", "__main__")}
    names |= {p.name for p in PKG.rglob("*") if p.is_dir() and (p / "__init__.py").exists()}
    clashes = sorted((a, b) for a in names for b in names if a != b and b.startswith(a))
    assert not clashes, clashes
