"""The repository stands alone: the tests read their data from tests/data only, every file there has
its origin and licence in tests/data/SOURCES.md, and nothing points outside the repository (a team
machine's folders, a data folder beside the checkout, an environment variable naming the data)."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import TEST_DATA

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
SOURCES = TEST_DATA / "SOURCES.md"

#: text that means "outside this repository" (built by concatenation so this file does not match)
FORBIDDEN = ["../" + "shared", "/" + "work/", "shared" + "/data", "DESIGN" + ".md", "CRYOACE_" + "SHARED"]
#: reading an environment variable whose name says it locates data
DATA_ENV = re.compile(r"""(environ(\.get)?\s*[\[(]\s*|getenv\(\s*)["'][A-Z0-9_]*(DATA|SHARED)""")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".cfg", ".ini", ".txt", ".yaml", ".yml", ".sh", ".json"}


def _text_files() -> list[Path]:
    """The repository's own text: src/, tests/ (not the data), docs/, the README and build files."""
    roots = [REPO / "src", TESTS, REPO / "docs", REPO / "scripts", REPO / ".ci"]
    files = [REPO / name for name in ("README.md", "Makefile", "pyproject.toml") if (REPO / name).is_file()]
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file() or TEST_DATA in path.parents or "__pycache__" in path.parts:
                continue
            if path.suffix in TEXT_SUFFIXES or path.parent.name == ".ci":
                files.append(path)
    return [p for p in files if p.resolve() != Path(__file__).resolve()]


def test_test_data_lives_in_the_repository():
    assert TEST_DATA.resolve() == (TESTS / "data").resolve()
    assert TEST_DATA.is_dir() and SOURCES.is_file()


def test_nothing_points_outside_the_repository():
    found = []
    for path in _text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            hits = [s for s in FORBIDDEN if s in line] + (["environment variable for data"]
                                                          if DATA_ENV.search(line) else [])
            found += [f"{path.relative_to(REPO)}:{number}: {hit}" for hit in hits]
    assert not found, "\n".join(found)


def test_conftest_reads_no_environment():
    text = (TESTS / "conftest.py").read_text()
    assert "environ" not in text and "getenv" not in text


def test_every_data_file_is_listed_in_sources():
    listed = set(re.findall(r"`([^`\s]+)`", SOURCES.read_text()))
    files = {p.relative_to(TEST_DATA).as_posix() for p in TEST_DATA.rglob("*") if p.is_file()} - {"SOURCES.md"}
    assert files, "tests/data is empty"
    assert not files - listed, f"not in tests/data/SOURCES.md: {sorted(files - listed)}"
    # and the other way: every data path SOURCES.md names is there
    named = {s for s in listed if s.split("/")[0] in ("models", "volumes", "particles") and "." in s}
    assert not named - files, f"named in SOURCES.md but missing: {sorted(named - files)}"
