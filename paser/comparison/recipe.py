"""The recipe of ``paser compare``: ``STAGES``, walked by ``compare`` below in this process and by
the Prefect flow (paser/flows/compare.py), both calling the same functions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from paser import progress
from paser.comparison.arms import Arm
from paser.comparison.report import Line, compared, render, summary
from paser.comparison.runner import Setup, finished_rows, load_sections, pending, prepare, run_arm

STAGES = ("prepare the setting", "run the arms", "run the arms at another arm's compute", "write the report")


@dataclass
class CompareResult:
    """A comparison's outcome: its folder, report, finished arms and verdicts."""

    out: Path
    report: Path
    rows: dict[str, dict]
    lines: list[Line]
    summary: str

    def verdicts(self) -> dict[str, str]:
        return {ln.arm: ln.verdict for ln in self.lines}


def compare(config: str | Path | None = None, overrides: dict | None = None, report_only: bool = False,
            picture: bool = True, **fields) -> CompareResult:
    """Run (or resume) the comparison of ``config`` (a YAML file with a ``compare`` section and the
    shared ``recover``, ``evaluate`` and selection sections), ``overrides`` as ``{section: {key:
    value}}`` and ``fields`` of the compare section on top. Finished arms are never run again;
    ``report_only`` runs none and writes the report from those finished."""
    sections = load_sections(config, (overrides or {}) | {"compare": (overrides or {}).get("compare", {}) | fields})
    setup = prepare(sections, str(config) if config else "compare", resolve=not report_only)
    if not report_only:
        todo = pending(setup, second=False) + pending(setup, second=True)
        progress.announce(f"compare: {len(todo)} of {len(setup.arms)} arms to run in {setup.root}")
        for i, arm in enumerate(todo, 1):
            run_one(arm, setup, f"{i}/{len(todo)} ")
    return finish(setup, picture)


def run_one(arm: Arm, setup: Setup, count: str = "") -> dict:
    """One arm with a line before and after (the progress lines paser prints)."""
    progress.announce(f"compare: arm {count}{arm.name} ...")
    row = run_arm(arm, setup)
    progress.announce(f"compare: arm {count}{arm.name} done" + (f" ({row['steps']} steps)" if "steps" in row else ""))
    return row


def finish(setup: Setup, picture: bool = True) -> CompareResult:
    """report.md (and compare.png) from the comparison's finished arms."""
    names = {a.name for a in setup.arms}
    rows = {k: v for k, v in finished_rows(setup).items() if k in names}
    lines = compared(setup.config, setup.arms, rows)
    text = render(setup.config, setup.arms, rows, setup.pruned, setup.root, lines, picture)
    path = setup.root / "report.md"
    path.write_text(text)
    return CompareResult(setup.root, path, rows, lines, summary(setup.config, lines, setup.pruned)[0])
