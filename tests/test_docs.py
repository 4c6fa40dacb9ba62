"""The docs: the command reference in docs/cli.md is generated from --help and must not drift; links and
references resolve; the README stays short and keeps its two set-up commands."""

import re

from acseg_cli.clidoc import CLI_DOC, render


def words(text: str) -> str:
    """The help's words: typer's layout (type metavars such as ``<list[str]>``, column widths, where a line
    breaks) changes between its releases, and CI installs the newest, so only options and texts must match."""
    text = re.sub(r"<[^<>\s]*>", " ", text)
    text = re.sub(r"-[ \t]*\n\s*", "-", text)  # a word broken at its hyphen
    return " ".join(text.split())


def test_cli_doc_help_blocks_are_current():
    text = CLI_DOC.read_text()
    assert "<!-- acseg help: extract -->" in text
    assert words(render(text)) == words(text), "docs/cli.md is stale: run 'python -m acseg_cli.clidoc'"


def test_the_help_comparison_still_sees_a_changed_option():
    text = CLI_DOC.read_text()
    assert words(text.replace("--allow-missing", "--allow-absent", 1)) != words(render(text))


def test_readme_has_exactly_two_setup_commands():
    text = (CLI_DOC.parents[1] / "README.md").read_text()
    block = text.split("## Two commands", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    cmds = [ln.split("#")[0].strip() for ln in block.strip().splitlines()]
    assert cmds == ["make demo", "make test"]


def _doc_files():
    from helpers import ROOT

    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_relative_link_in_the_docs_resolves():
    from helpers import ROOT

    broken = []
    for doc in _doc_files():
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_every_docs_reference_in_code_and_docs_resolves():
    """Code, docs and benchmarks cite pages of docs/ and benchmarks/ by path: each must be in the
    repository, and nothing cites the upper-case method file of the project's notes, which users do not get."""
    from helpers import ROOT

    files = [
        *ROOT.glob("stages/*.py"),
        *ROOT.glob("acseg_cli/*.py"),
        *ROOT.glob("tests/*.py"),
        *ROOT.glob("benchmarks/*.py"),
        ROOT / "examples" / "Makefile",
        *_doc_files(),
    ]
    missing = []
    for f in files:
        text = f.read_text()
        notes = "METHOD" + ".md"
        assert not re.search(r"(?<![\w/])" + re.escape(notes), text), f"{f.name} cites {notes}: cite docs/method.md"
        for ref in re.findall(r"\b((?:docs|benchmarks)/[\w./-]+\.(?:md|png))", text):
            if not (ROOT / ref).exists():
                missing.append(f"{f.relative_to(ROOT)}: {ref}")
    assert not missing, missing


def test_readme_stays_short():
    text = (CLI_DOC.parents[1] / "README.md").read_text()
    assert len(text.splitlines()) <= 200, "README.md is over its 200-line budget: move reference to docs/"
    assert max(len(line) for line in text.splitlines()) <= 200, "a README line is over 200 characters"
