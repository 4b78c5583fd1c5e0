"""The README's architecture map ("Where things live") names every source file, and only files that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _map_rows() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+\.py)` \| (.+) \|$", section, flags=re.M)


def test_architecture_map_lists_every_source_file_once():
    rows = _map_rows()
    listed = [path for path, _ in rows]
    files = sorted(p.relative_to(ROOT).as_posix() for folder in ("moeify", "passes")
                   for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)
    assert sorted(listed) == files
    assert len(set(listed)) == len(listed)
    assert all(len(what.strip()) > 10 for _, what in rows)  # each row says what the file holds
