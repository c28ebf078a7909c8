"""Rewrite the README's table of supported architectures from the Auto registry
(`msfx.models.auto.supported_table`); `tests/test_auto.py` fails when the README is stale.

Run: python scripts/update_readme_table.py
"""
from __future__ import annotations

from pathlib import Path

from msfx.models.auto import supported_table

BEGIN, END = "<!-- supported-models:begin -->", "<!-- supported-models:end -->"


def main() -> None:
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text()
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    readme.write_text(f"{head}{BEGIN}\n{supported_table()}\n{END}{tail}")


if __name__ == "__main__":
    main()
