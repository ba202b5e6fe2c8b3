"""docs/reliability.md lists every bad-input test, and each row matches the test it names.

A row is ``| case | expected message (start) | tests/FILE.py::test_name[id] |``. In the message
cell, each part in backticks is text of the message; ``PATH`` and ``...`` inside it stand for
the varying parts. Checked here: the named test is defined in that file, every fixed part of the
message appears in that file (so a row cannot drift from its test), and every test marked
``@pytest.mark.bad_input`` has a row (so a new bad-input test without one fails).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
PLACEHOLDER = re.compile(r"PATH|\.\.\.")


def table_rows(text: str) -> list[tuple[str, str, str]]:
    """(case, message, test) of every row of the table in ``text`` (header and rule excluded)."""
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 3 or cells[0] == "case" or set(cells[0]) <= set("-: "):
            continue
        rows.append((cells[0], cells[1], cells[2].strip("`")))
    return rows


def message_parts(message: str) -> list[str]:
    """The fixed text of the backticked parts of a message cell."""
    parts = []
    for code in re.findall(r"`([^`]+)`", message):
        parts += [part.strip(" :;") for part in PLACEHOLDER.split(code) if part.strip(" :;")]
    return parts


def defined_tests(path: Path) -> dict[str, ast.FunctionDef]:
    """Module-level test functions of a test file by name."""
    tree = ast.parse(path.read_text())
    return {node.name: node for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def is_bad_input(function: ast.FunctionDef) -> bool:
    """Whether ``function`` is decorated with ``pytest.mark.bad_input``."""
    return any(isinstance(d, ast.Attribute) and d.attr == "bad_input"
               and isinstance(d.value, ast.Attribute) and d.value.attr == "mark"
               for d in function.decorator_list)


def marked_tests() -> set[str]:
    """``tests/FILE.py::name`` of every test marked bad_input."""
    return {f"tests/{path.name}::{name}" for path in sorted((ROOT / "tests").glob("test_*.py"))
            for name, function in defined_tests(path).items() if is_bad_input(function)}


def test_table_parser_and_message_parts():
    text = ("| case | expected message (start) | test |\n|---|---|---|\n"
            "| a missing file | `PATH: not found; ...` then `fix it` | `tests/x.py::test_y[z]` |\n")
    assert table_rows(text) == [("a missing file", "`PATH: not found; ...` then `fix it`",
                                 "tests/x.py::test_y[z]")]
    assert message_parts("`PATH: not found; ... rest` then `fix it`") == ["not found", "rest", "fix it"]


def test_every_row_names_a_test_that_checks_its_message():
    rows = table_rows(DOC.read_text())
    assert len(rows) >= 30
    for case, message, test in rows:
        file, _, name = test.partition("::")
        path = ROOT / file
        assert path.is_file(), f"{case}: {file} does not exist"
        assert name.split("[")[0] in defined_tests(path), f"{case}: {test} is not defined"
        parts = message_parts(message)
        assert parts or "no message" in message, f"{case}: no message text in backticks"
        source = path.read_text()
        for part in parts:
            assert part in source, f"{case}: {part!r} does not appear in {file}"


def test_every_bad_input_test_has_a_row():
    named = {test.split("[")[0] for _, _, test in table_rows(DOC.read_text())}
    marked = marked_tests()
    assert len(marked) >= 20
    missing = sorted(marked - named)
    assert not missing, f"bad_input tests without a row in docs/reliability.md: {missing}"
