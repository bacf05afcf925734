"""The documentation holds: every `paser ...` command in a fenced block of the README or docs/ uses
options its command has, every page the README links to exists, the README stays a front page, and
the configuration reference is what the configs say."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from paser.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GLOBAL = {"--quiet", "-q", "--debug", "--help"}


def fenced_commands(text: str) -> list[str]:
    """Each `paser ...` command line of the fenced code blocks (continuation lines joined, comments
    dropped), from where ``paser`` starts (after ``torchrun ... --no-python`` too)."""
    found = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            try:
                words = shlex.split(line)
            except ValueError:  # an apostrophe in a comment-less line: split on spaces
                words = line.split()
            if "paser" in words:
                found.append(" ".join(words[words.index("paser"):]))
    return found


def options_of() -> dict[str, set[str]]:
    commands = typer.main.get_command(app).commands
    return {name: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | GLOBAL
            for name, cmd in commands.items()}


def test_the_command_finder_reads_blocks_and_continuations():
    text = ("```bash\npaser select --budget 0.2tok   # note\n"
            "torchrun --nproc-per-node 2 --no-python paser recover m \\\n  --data x.jsonl --no-flow\n```\n"
            "```\npaser/  not a command\n```\n")
    assert fenced_commands(text) == ["paser select --budget 0.2tok", "paser recover m --data x.jsonl --no-flow"]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_command_in_the_docs_uses_options_its_command_has(page):
    known = options_of()
    wrong = []
    for command in fenced_commands(page.read_text()):
        words = [w for w in command.split()[1:] if w not in GLOBAL]
        if not words or words[0].startswith("-"):
            continue
        name, rest = words[0], words[1:]
        if name not in known:
            wrong.append(f"{command}: no command {name!r}")
            continue
        wrong += [f"{command}: {w.split('=')[0]}" for w in rest
                  if w.startswith("--") and w.split("=")[0] not in known[name]]
    assert wrong == []


def test_the_readme_is_a_front_page_whose_links_hold():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    links = re.findall(r"\]\(((?:docs/)?[\w./-]+\.(?:md|png))(?:#[\w-]+)?\)", readme)
    assert links and all((ROOT / link).is_file() for link in links), links
    for page in (ROOT / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([\w./-]+\.md)(?:#[\w-]+)?\)", page.read_text()):
            assert (page.parent / link).is_file(), f"{page.name} links to {link}"


def test_the_configuration_reference_is_what_the_configs_say():
    from paser.cli.options import configuration_reference

    assert (ROOT / "docs" / "configuration.md").read_text().strip() == configuration_reference().strip()
