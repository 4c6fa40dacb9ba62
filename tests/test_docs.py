"""The README's command reference is generated from --help and must not drift."""

from acseg_cli.readme import README, render


def test_readme_help_blocks_are_current():
    text = README.read_text()
    assert "<!-- acseg help: extract -->" in text
    assert render(text) == text, "README command reference is stale: run 'python -m acseg_cli.readme'"


def test_readme_has_exactly_two_setup_commands():
    text = README.read_text()
    block = text.split("## Two commands", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    cmds = [ln.split("#")[0].strip() for ln in block.strip().splitlines()]
    assert cmds == ["make demo", "make test"]
