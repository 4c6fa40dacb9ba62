"""The README's command reference is generated from --help and must not drift."""

import re

from acseg_cli.readme import README, render


def words(text: str) -> str:
    """The help's words: typer's layout (type metavars such as ``<list[str]>``, column widths, where a line
    breaks) changes between its releases, and CI installs the newest, so only options and texts must match."""
    text = re.sub(r"<[^<>\s]*>", " ", text)
    text = re.sub(r"-[ \t]*\n\s*", "-", text)  # a word broken at its hyphen
    return " ".join(text.split())


def test_readme_help_blocks_are_current():
    text = README.read_text()
    assert "<!-- acseg help: extract -->" in text
    assert words(render(text)) == words(text), "README command reference is stale: run 'python -m acseg_cli.readme'"


def test_the_help_comparison_still_sees_a_changed_option():
    text = README.read_text()
    assert words(text.replace("--allow-missing", "--allow-absent", 1)) != words(render(text))


def test_readme_has_exactly_two_setup_commands():
    text = README.read_text()
    block = text.split("## Two commands", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    cmds = [ln.split("#")[0].strip() for ln in block.strip().splitlines()]
    assert cmds == ["make demo", "make test"]
