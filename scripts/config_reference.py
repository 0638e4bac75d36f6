"""Write the docs' configuration table (docs/configuration.md) from the config schema
(``pipeline.config.KEYS``), so the reference cannot drift from the code; ``tests/test_config.py``
fails when the page is stale.

    python scripts/config_reference.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.cli import config_reference  # noqa: E402

BLOCK = re.compile(r"(<!-- config-reference:[^\n]*-->\n)(.*?)(<!-- end of config-reference -->)", re.S)


def render(readme: str) -> str:
    """``readme`` (the page) with its configuration block replaced by the generated table."""
    if not BLOCK.search(readme):
        raise SystemExit("docs/configuration.md has no config-reference block")
    return BLOCK.sub(lambda m: m.group(1) + config_reference() + m.group(3), readme)


if __name__ == "__main__":
    path = ROOT / "docs" / "configuration.md"
    path.write_text(render(path.read_text()))
    print(f"wrote the configuration table into {path}")
