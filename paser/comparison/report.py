"""report.md and compare.png: per budget, every arm against the mean of its budget's random
subsets, with paired intervals, compute, and the verdict of the registered rule; the arms at
another arm's compute; the recovered models against the pruned one; per-task or per-family values;
a two-line summary at the top."""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from paser.comparison import stats
from paser.comparison.arms import Arm
from paser.comparison.config import CompareConfig
from paser.comparison.runner import total_flops

METRIC_NAMES = {"zeroshot": "mean accuracy over the lm-eval tasks", "heldout_nll": "held-out response NLL",
                "suite_nll": "suite answer NLL (macro)"}


@dataclass
class Line:
    """One arm measured against its budget's random subsets."""

    arm: str
    budget: str
    value: float
    difference: float
    items: tuple[float, float]
    groups: tuple[float, float]
    place: str
    flops: float | None
    ratio: float | None
    verdict: str


def compared(cfg: CompareConfig, arms: list[Arm], rows: dict[str, dict]) -> list[Line]:
    """Every finished trained arm against the random subsets of its budget (at least two needed);
    the random subsets themselves against the others' mean; arms at another's compute against the
    random subsets trained at that compute."""
    lines = []
    for arm in arms:
        if arm.reference or arm.name not in rows:
            continue
        if arm.at_compute_of is not None:
            continue
        randoms = [a.name for a in arms if a.is_random and a.budget == arm.budget and a.name in rows
                   and a.name != arm.name]
        if len(randoms) < 2:
            continue
        lines.append(line(cfg, arm, [arm.name], randoms, rows, arms))
    for target in dict.fromkeys(a.at_compute_of for a in arms if a.at_compute_of):
        matched = [a.name for a in arms if a.at_compute_of == target and a.name in rows]
        if target in rows and len(matched) >= 2:
            lines.append(line(cfg, next(a for a in arms if a.name == target), [target], matched, rows, arms,
                              label=f"{target} at equal compute"))
    return lines


def line(cfg: CompareConfig, arm: Arm, mine: list[str], randoms: list[str], rows: dict, arms: list[Arm],
         label: str | None = None) -> Line:
    gs = stats.groups([rows[a] for a in [*mine, *randoms]], cfg.metric, tasks(cfg, rows))
    values = stats.metric_value(gs)
    k = len(mine)
    interval = stats.paired_bootstrap(gs, k, cfg.bootstrap, cfg.bootstrap_seed)
    by_group = stats.group_bootstrap(gs, k, cfg.bootstrap, cfg.bootstrap_seed)
    value, theirs = float(values[:k].mean()), [float(v) for v in values[k:]]
    flops = total_flops(rows[mine[0]])
    spent = [total_flops(rows[a]) for a in randoms]
    ratio = flops / statistics.mean(spent) if flops is not None and None not in spent else None
    decided = stats.verdict(value, theirs, interval, cfg.higher_is_better)
    if decided == "beats random" and not arm.is_random and label is None:
        decided = seeds_verdict(cfg, arm, randoms, rows)
    if arm.is_random:
        decided = "(a random subset, against the other random subsets)"
    return Line(label or arm.name, arm.budget, value, value - statistics.mean(theirs), interval, by_group,
                stats.place(value, theirs, cfg.higher_is_better), flops, ratio, decided)


def seeds_verdict(cfg: CompareConfig, arm: Arm, randoms: list[str], rows: dict) -> str:
    """A candidate's verdict once its recovery seeds have run: read on their mean."""
    seeds = [arm.name] + [f"{arm.name}#{k}" for k in range(1, cfg.recovery_seeds)]
    missing = [s for s in seeds if s not in rows]
    if missing:
        return f"candidate: recovery seeds {', '.join(s.split('#')[1] for s in missing)} pending ({', '.join(missing)})"
    gs = stats.groups([rows[a] for a in [*seeds, *randoms]], cfg.metric, tasks(cfg, rows))
    values = stats.metric_value(gs)
    mean = float(values[:len(seeds)].mean())
    interval = stats.paired_bootstrap(gs, len(seeds), cfg.bootstrap, cfg.bootstrap_seed)
    decided = stats.verdict(mean, [float(v) for v in values[len(seeds):]], interval, cfg.higher_is_better)
    return (f"{decided} over {len(seeds)} recovery seeds (mean {mean:.4f}, "
            f"[{interval[0]:+.4f}, {interval[1]:+.4f}])")


def tasks(cfg: CompareConfig, rows: dict) -> list[str] | None:
    """The lm-eval tasks the metric averages: those every arm scored."""
    if cfg.metric != "zeroshot":
        return None
    found = [set(r["zeroshot"]["tasks"]) for r in rows.values() if "zeroshot" in r]
    return sorted(set.intersection(*found)) if found else None


def against_pruned(cfg: CompareConfig, arms: list[Arm], rows: dict) -> list[str]:
    """Does recovery help or hurt against the pruned model? Per budget the random subsets' mean,
    and every other trained arm, minus ``none``, with the paired interval over items."""
    if "none" not in rows:
        return []
    out = []
    for budget in dict.fromkeys(a.budget for a in arms if not a.reference):
        randoms = [a.name for a in arms if a.is_random and a.budget == budget and a.name in rows]
        others = [a.name for a in arms if a.budget == budget and not a.is_random and a.name in rows
                  and a.objective is None and a.recovery_seed == 0]
        for names, label in ([(randoms, f"{budget}: random subsets (mean of {len(randoms)})")] if randoms else []) + [
                ([n], n) for n in others]:
            gs = stats.groups([rows[a] for a in [*names, "none"]], cfg.metric, tasks(cfg, rows))
            values = stats.metric_value(gs)
            lo, hi = stats.paired_bootstrap(gs, len(names), cfg.bootstrap, cfg.bootstrap_seed)
            diff = float(values[:-1].mean() - values[-1])
            out.append(f"| {label} | {values[:-1].mean():.4f} | {diff:+.4f} | [{lo:+.4f}, {hi:+.4f}] |")
    return out


def group_table(cfg: CompareConfig, arms: list[Arm], rows: dict) -> list[str]:
    """Every finished arm's value in each group (task or family) and overall."""
    names = [a.name for a in arms if a.name in rows]
    if not names:
        return []
    gs = stats.groups([rows[a] for a in names], cfg.metric, tasks(cfg, rows))
    per_group, overall = stats.group_values(gs), stats.metric_value(gs)
    # BoolQ moves the other way from the rest on small models (pruning raises the dense model's
    # below-chance BoolQ): the mean without it is shown beside
    without = [i for i, g in enumerate(gs) if g.name != "boolq"] if cfg.metric == "zeroshot" else []
    extra = len(without) < len(gs) and len(without) > 0
    head = ["| arm | " + " | ".join(g.name for g in gs) + " | mean |" + (" mean without boolq |" if extra else ""),
            "|---|" + "---:|" * (len(gs) + 1 + extra)]
    return head + [f"| {n} | " + " | ".join(f"{v:.4f}" for v in per_group[i]) + f" | {overall[i]:.4f} |"
                   + (f" {per_group[i, without].mean():.4f} |" if extra else "") for i, n in enumerate(names)]


def secondary_table(arms: list[Arm], rows: dict) -> list[str]:
    """Held-out NLL, JSD to the dense model and the step counts, where measured."""
    out = ["| arm | records | tokens | steps | held-out NLL | JSD to dense (held-out) | compute (TFLOP) | "
           "selection s | recovery s | eval s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm in arms:
        row = rows.get(arm.name)
        if row is None:
            continue
        nll = row.get("heldout", {}).get("nll")
        jsd = row.get("jsd", {}).get("heldout", {}).get("mean")
        flops = total_flops(row)
        cells = [row.get("selected", ""), row.get("selected_tokens", ""), row.get("steps", ""),
                 "" if nll is None else f"{nll:.4f}", "" if jsd is None else f"{jsd:.4f}",
                 "" if flops is None else f"{flops / 1e12:.2f}", *(f"{row[k]:.0f}" if k in row else ""
                                                                   for k in ("selection_s", "recovery_s", "eval_s"))]
        out.append(f"| {arm.name} | " + " | ".join(str(c) for c in cells) + " |")
    return out


def summary(cfg: CompareConfig, lines: list[Line], pruned: str) -> list[str]:
    """Two lines a user can act on."""
    plain = [ln for ln in lines if "equal compute" not in ln.arm and not ln.verdict.startswith("(a random")]
    winners = [ln for ln in plain if ln.verdict.startswith("beats random")]
    metric = METRIC_NAMES[cfg.metric]
    if not plain:
        return ["**Summary:** not enough arms finished to compare (each budget needs two random subsets and one "
                "other arm)."]
    if winners:
        best = max(winners, key=lambda ln: ln.difference if cfg.higher_is_better else -ln.difference)
        first = (f"**On {pruned}, at budget {best.budget}: use {best.arm}.** It beats random subsets on the {metric} "
                 f"by {best.difference:+.4f} [{best.items[0]:+.4f}, {best.items[1]:+.4f}] at "
                 f"{_ratio(best.ratio)} their compute.")
        equal = next((ln for ln in lines if ln.arm == f"{best.arm} at equal compute"), None)
        if equal is not None:
            first += (f" Against random subsets trained at its total compute: {equal.verdict} "
                      f"({equal.difference:+.4f} [{equal.items[0]:+.4f}, {equal.items[1]:+.4f}]).")
    else:
        candidates = [ln for ln in plain if ln.verdict.startswith("candidate")]
        first = (f"**On {pruned}: use a random subset.** No selection beat random subsets on the {metric}"
                 + (f" yet ({', '.join(c.arm for c in candidates)} await their recovery seeds)." if candidates else
                    f"; {len(plain)} arm(s) compared, verdicts: " + ", ".join(f"{ln.arm} {ln.verdict}"
                                                                             for ln in plain) + "."))
    losers = [ln.arm for ln in plain if ln.verdict == "loses"]
    second = ("Lost to random: " + ", ".join(losers) + "." if losers else "No arm lost to random.")
    return [first, "", second]


def _ratio(ratio: float | None) -> str:
    return "?" if ratio is None else f"{ratio:.2f}x"


def render(cfg: CompareConfig, arms: list[Arm], rows: dict, pruned: str, root: Path, lines: list[Line],
           picture: bool = True) -> str:
    """The report's text from ``compared``'s lines; also writes compare.png into ``root`` when ``picture``."""
    better = "higher" if cfg.higher_is_better else "lower"
    out = [f"# paser compare: {root}", "", *summary(cfg, lines, pruned), "",
           f"Primary metric: {METRIC_NAMES[cfg.metric]} ({better} is better). Each arm minus the mean of its budget's "
           f"random subsets, with the paired bootstrap {cfg.bootstrap}-draw 95% interval over items (and over "
           "groups: tasks or families); verdict: better than every random subset with the interval excluding zero "
           f"beats random (final after {cfg.recovery_seeds} recovery seeds), worse than every one with the interval "
           "excluding zero loses, otherwise level.", ""]
    if lines:
        out += ["| arm | budget | metric | minus random | 95% over items | 95% over groups | against the random "
                "subsets | compute (TFLOP) | / random's | verdict |", "|---|---|---:|---:|---|---|---|---:|---:|---|"]
        for ln in lines:
            flops = "" if ln.flops is None else f"{ln.flops / 1e12:.2f}"
            out.append(f"| {ln.arm} | {ln.budget} | {ln.value:.4f} | {ln.difference:+.4f} | [{ln.items[0]:+.4f}, "
                       f"{ln.items[1]:+.4f}] | [{ln.groups[0]:+.4f}, {ln.groups[1]:+.4f}] | {ln.place} | {flops} | "
                       f"{_ratio(ln.ratio)} | {ln.verdict} |")
    pruned_lines = against_pruned(cfg, arms, rows)
    if pruned_lines:
        out += ["", "## Recovery against the pruned model (`none`)", "",
                "| arms | metric | minus none | 95% over items |", "|---|---:|---:|---|", *pruned_lines]
    table = group_table(cfg, arms, rows)
    if table:
        out += ["", "## Per task" if cfg.metric == "zeroshot" else "## Per group", "", *table]
    out += ["", "## Every arm", "", *secondary_table(arms, rows), ""]
    if picture and lines:
        draw(cfg, lines, root / "compare.png")
        out += ["![difference from the random mean against total compute](compare.png)", ""]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out))


def draw(cfg: CompareConfig, lines: list[Line], path: Path) -> None:
    """Difference from the random mean against total compute, with intervals; the random subsets
    (each against the others) as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    randoms = [ln for ln in lines if ln.verdict.startswith("(a random") and ln.flops is not None]
    if randoms:
        ax.axhspan(min(r.items[0] for r in randoms), max(r.items[1] for r in randoms), color="0.9",
                   label="random subsets (each against the others, 95%)")
    for ln in lines:
        if ln.flops is None or ln.verdict.startswith("(a random"):
            continue
        ax.errorbar(ln.flops / 1e12, ln.difference, yerr=[[ln.difference - ln.items[0]], [ln.items[1] - ln.difference]],
                    fmt="o", capsize=3)
        ax.annotate(ln.arm, (ln.flops / 1e12, ln.difference), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.axhline(0, color="0.4", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("total compute, selection + recovery (TFLOP)")
    ax.set_ylabel(f"minus the random mean ({'higher' if cfg.higher_is_better else 'lower'} is better)")
    ax.set_title(METRIC_NAMES[cfg.metric])
    if randoms:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
