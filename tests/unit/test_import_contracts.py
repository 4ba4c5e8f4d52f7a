"""The import rules of docs/architecture.md hold, and each one fails when it is broken.

``./dev test`` runs ``lint-imports`` on the tree; these tests show that the contracts in
pyproject.toml are not vacuous: a copy of the package with one forbidden import added
breaks exactly the contract that forbids it (real import-linter, real files).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

#: For each contract (by name): a module of the package and the import that breaks it.
VIOLATIONS = {
    "protocol imports no gpg, network or CLI code": ("protocol.py", "import smtplib"),
    "client and server never import each other": (
        "client/pending.py",
        "import mailsh.server.spool",
    ),
    "nothing outside mailsh.cli imports typer, rich or mailsh.cli": ("status.py", "import rich"),
    "keys know no mail, client, server or CLI": ("keys/trust.py", "import mailsh.mail.message"),
    "mail knows no client, server, keys or CLI": ("mail/watch.py", "import mailsh.keys.gpg"),
}


def _contracts() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [c["name"] for c in config["tool"]["importlinter"]["contracts"]]


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}  # the copy, not the installed package
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_every_contract_has_a_violation_to_prove_it() -> None:
    assert sorted(_contracts()) == sorted(VIOLATIONS)


def test_the_tree_keeps_every_contract() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {len(VIOLATIONS)} kept, 0 broken." in result.stdout


@pytest.mark.parametrize("contract", sorted(VIOLATIONS))
def test_a_forbidden_import_breaks_its_contract(contract: str, tmp_path: Path) -> None:
    shutil.copytree(ROOT / "mailsh", tmp_path / "mailsh", ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    module, line = VIOLATIONS[contract]
    with (tmp_path / "mailsh" / module).open("a") as fh:
        fh.write(f"\n{line}  # planted by the test\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert f"{contract} BROKEN" in result.stdout
    assert f"Contracts: {len(VIOLATIONS) - 1} kept, 1 broken." in result.stdout
