"""Keep docs/cli.md equal to ``--help``: ``python -m acseg_cli.clidoc`` rewrites the blocks between
``<!-- acseg help: CMD -->`` and ``<!-- end help -->``; a test checks they are current."""

from __future__ import annotations

import re
import sys
from pathlib import Path

COMMANDS = ["extract", "fit-acg", "conceptualize", "classify", "refine", "score", "backbones"]
CLI_DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
BLOCK = re.compile(r"(<!-- acseg help: (?P<cmd>[\w-]+) -->\n)(.*?)(<!-- end help -->)", re.S)


def help_text(cmd: str) -> str:
    from typer.testing import CliRunner

    from .app import app

    r = CliRunner(env={"COLUMNS": "100", "TERM": "dumb", "NO_COLOR": "1", "_TYPER_FORCE_DISABLE_TERMINAL": "1"}).invoke(
        app, [cmd, "--help"], prog_name="acseg"
    )
    lines = [ln.rstrip() for ln in r.stdout.splitlines()]
    return "\n".join(lines).strip("\n") + "\n"


def render(text: str) -> str:
    return BLOCK.sub(lambda m: f"{m.group(1)}```text\n{help_text(m.group('cmd'))}```\n{m.group(4)}", text)


def main() -> int:
    text = CLI_DOC.read_text()
    new = render(text)
    if "--check" in sys.argv:
        return 0 if new == text else 1
    CLI_DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
