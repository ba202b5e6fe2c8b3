"""bench/report.py: every bench script writes docs/benchmarks.md through update_section only."""

from __future__ import annotations

import re
from pathlib import Path

import bench.report as report

ROOT = Path(__file__).resolve().parents[1]
SECTION = re.compile(r"<!-- (\w+):start -->\n(.*?)\n<!-- \1:end -->", re.S)


def test_rewriting_each_section_with_its_own_body_leaves_the_doc_unchanged(tmp_path, monkeypatch):
    original = (ROOT / "docs" / "benchmarks.md").read_text()
    doc = tmp_path / "benchmarks.md"
    doc.write_text(original)
    monkeypatch.setattr(report, "DOC", doc)
    sections = SECTION.findall(original)
    assert len(sections) >= 9
    for name, body in sections:
        assert body.splitlines()[0].startswith("## ") and "Command: `python bench/" in body, name
        report.update_section(name, body)
    assert doc.read_text() == original
    assert list(tmp_path.iterdir()) == [doc]  # no temporary left


def test_update_section_replaces_its_own_section_and_appends_new_ones(tmp_path, monkeypatch):
    doc = tmp_path / "benchmarks.md"
    monkeypatch.setattr(report, "DOC", doc)
    report.update_section("a", "## A\n\nCommand: `one`")
    assert doc.read_text().startswith(report.HEADER)
    report.update_section("b", "## B\n\nfigures 1")
    doc.write_text(doc.read_text() + "\nhand-written analysis\n")
    report.update_section("a", "## A\n\nCommand: `two`\n")
    assert doc.read_text() == (f"{report.HEADER}\n<!-- a:start -->\n## A\n\nCommand: `two`\n"
                               "<!-- a:end -->\n\n<!-- b:start -->\n## B\n\nfigures 1\n<!-- b:end -->\n\n"
                               "hand-written analysis\n")


def test_every_bench_script_writes_through_update_section():
    for script in sorted((ROOT / "bench").glob("bench_*.py")):
        text = script.read_text()
        assert "publish(" not in text, script.name
        if "docs/benchmarks.md" in text or "update_section" in text:
            call = r"update_section\((\"\w+\"|SECTION|section|section_name), \w+\)"
            assert re.search(call, text), script.name
    assert not hasattr(report, "publish")
