"""docs/architecture.md matches the code: it names every module, and each file it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = (ROOT / "docs" / "architecture.md").read_text()
MODULES = sorted(
    p.relative_to(ROOT / "mailsh")
    for p in (ROOT / "mailsh").rglob("*.py")
    if p.name not in ("__init__.py", "__main__.py")
)


def test_every_module_is_named_on_the_page() -> None:
    missing = [str(m) for m in MODULES if f"`{m.name}`" not in PAGE and f"/{m.name}`" not in PAGE]
    assert missing == []


def test_every_module_the_page_names_exists() -> None:
    named = set(re.findall(r"`((?:[a-z_]+/)*[a-z_]+\.py)`", PAGE))
    files = [
        p.relative_to(ROOT).parts for d in ("mailsh", "tests") for p in (ROOT / d).rglob("*.py")
    ]
    suffixes = {"/".join(parts[i:]) for parts in files for i in range(len(parts))}
    assert sorted(named - suffixes) == []
