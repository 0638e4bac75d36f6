"""The documentation's examples run: every ``$`` command of a ``console`` block and every
``python`` block of the README and of each page in mkdocs.yml's order, in one folder (so a page
may use what an earlier one made, as a reader following them would), on the sample data. A block
whose first line says ``# not run by the docs test: <why>`` is skipped, with its reason in the
page. Commands are checked for success, not for their output's numbers."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.M | re.S)
SKIP = "# not run by the docs test:"


def _pages() -> list[Path]:
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    found: list[str] = []

    def walk(entry: object) -> None:
        if isinstance(entry, str):
            found.append(entry)
        elif isinstance(entry, dict):
            for value in entry.values():
                walk(value)
        elif isinstance(entry, list):
            for value in entry:
                walk(value)

    walk(nav)
    return [ROOT / "docs" / page for page in found] + [ROOT / "README.md"]  # the README's example uses demo/data


def _examples(page: Path) -> list[tuple[str, str]]:
    """(kind, code) of the page's runnable examples: "shell" commands and "python" blocks."""
    out = []
    for lang, body in FENCE.findall(page.read_text()):
        if body.lstrip().startswith(SKIP):
            continue
        if lang == "console":
            command: list[str] = []
            for line in body.splitlines():
                if line.startswith("$ "):
                    command = [line[2:]]
                elif command and command[-1].endswith("\\"):
                    command.append(line)
                else:
                    if command:
                        out.append(("shell", "\n".join(command)))
                    command = []
                    continue
                if not command[-1].endswith("\\"):
                    out.append(("shell", "\n".join(command)))
                    command = []
        elif lang == "python" and ">>>" not in body:
            out.append(("python", body))
    return out


def test_the_docs_pages_are_the_ones_mkdocs_builds():
    """Every page under docs/ is in the nav, and every nav entry exists (the site builds strictly in CI)."""
    pages = {p.relative_to(ROOT / "docs") for p in _pages()[:-1]}
    on_disk = {p.relative_to(ROOT / "docs") for p in (ROOT / "docs").rglob("*.md")}
    assert pages == on_disk


def test_the_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_bytes()) <= 12_000


@pytest.mark.slow
def test_every_example_in_the_docs_runs(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["PYTHONPATH"] = str(ROOT)
    ran = 0
    for page in _pages():
        for kind, code in _examples(page):
            if kind == "shell":
                if code.startswith("pip install"):
                    continue  # the package is installed already
                # the repository's scripts, from the folder the examples share
                argv = [
                    "bash",
                    "-c",
                    "set -euo pipefail\n" + code.replace("python scripts/", f"python {ROOT}/scripts/"),
                ]
            else:
                argv = [sys.executable, "-c", code]
            done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            where = f"{page.relative_to(ROOT)}: {shlex.quote(code.splitlines()[0])[:150]}"
            assert done.returncode == 0, f"{where}\n{done.stderr[-3000:]}"
            ran += 1
    assert ran >= 20


def test_environment_yml_lists_every_runtime_dependency():
    """environment.yml (for conda users with GPUs; conda-forge is out of CI's reach) names every
    dependency of pyproject.toml, faiss-cpu as faiss-gpu."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!\[ ]", d, maxsplit=1)[0].lower() for d in deps}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    listed = {re.split(r"[<>=! ]", str(d), maxsplit=1)[0].lower() for d in env if isinstance(d, str)}
    missing = {n for n in names if n.replace("faiss-cpu", "faiss-gpu") not in listed}
    assert not missing, f"environment.yml lacks {sorted(missing)}"


def test_every_relative_link_of_the_readme_and_contributing_resolves():
    """The docs site checks its own links (mkdocs --strict); these two live outside it."""
    broken = []
    for page in (ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md"):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.name}: {target}")
    assert not broken, broken
