"""The run's manifest and human report: what was selected, from which clusters, and why.

    python -c "from paser.selection.settings import Settings; from paser.selection.report import write_report; \
write_report(Settings(), __import__('pathlib').Path('runs/select'))"
"""

from __future__ import annotations

import json
import platform
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from paser.errors import DataError
from paser.selection.budget import record_tokens

PACKAGES = ("paser", "torch", "transformers", "sentence-transformers", "scikit-learn", "scipy", "numpy",
            "prefect", "peft")


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def family_ari(run: Path) -> float | None:
    """Adjusted Rand index of the clusters against the records' ``family`` labels, when they have one."""
    from sklearn.metrics import adjusted_rand_score

    pool = pd.read_parquet(run / "pool.parquet", columns=["id", "fields"])
    families = [json.loads(f).get("family") for f in pool["fields"]]
    if any(f is None for f in families):
        return None
    clusters = pd.read_parquet(run / "clusters.parquet").set_index("id").loc[pool["id"], "cluster"]
    return float(adjusted_rand_score(families, clusters.to_numpy()))


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


MAP_POINTS = 5000  # records drawn on the cluster map at most (a seeded sample beyond)


def map_layout(coords: np.ndarray, seed: int = 0, max_points: int = MAP_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """(record indices, their 2-D positions): t-SNE of the manifold coordinates, the space the
    clusters were found in (its first two axes alone put most records on a few dots), on at most
    ``max_points`` records; deterministic for a seed."""
    from sklearn.manifold import TSNE

    n = len(coords)
    index = np.arange(n) if n <= max_points else np.sort(np.random.default_rng(seed).choice(n, max_points,
                                                                                           replace=False))
    points = np.asarray(coords, dtype=np.float64)[index]
    if len(index) < 5 or points.shape[1] < 2:
        xy = np.zeros((len(index), 2))
        xy[:, :min(2, points.shape[1])] = points[:, :2]
        return index, xy
    tsne = TSNE(n_components=2, perplexity=min(30.0, (len(index) - 1) / 3), init="pca", max_iter=500,
                random_state=seed)
    return index, tsne.fit_transform(points)


def map_figure(xy: np.ndarray, clusters, degradation, signal: str = "jsd", names: dict | None = None):
    """The records on the 2-D map, coloured by cluster (each labelled at its centre with its
    number and name) and by degradation."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6))
    clusters = np.asarray(clusters)
    palette = plt.get_cmap("tab20").colors  # one colour per cluster (they repeat past 20)
    axes[0].scatter(xy[:, 0], xy[:, 1], c=[palette[int(c) % len(palette)] for c in clusters], s=6)
    for cluster in np.unique(clusters):
        members = xy[clusters == cluster]
        # the label sits on the member nearest the cluster's median, on a blob of its own points
        centre = members[np.argmin(((members - np.median(members, axis=0)) ** 2).sum(1))]
        label = f"{cluster}: {names.get(int(cluster), '')}" if names else str(cluster)
        axes[0].annotate(label, centre, fontsize=7, ha="center", weight="bold",
                         bbox={"boxstyle": "round,pad=0.2", "fc": "white", "alpha": 0.7, "lw": 0})
    axes[0].set_title("clusters (t-SNE of the manifold coordinates)")
    sc = axes[1].scatter(xy[:, 0], xy[:, 1], c=np.nan_to_num(np.asarray(degradation, dtype=float)), cmap="magma",
                         s=6)
    fig.colorbar(sc, ax=axes[1], label=signal)
    axes[1].set_title("degradation")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def cluster_map(run: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The run's map layout (record indices and positions), computed once into cluster_map.npz."""
    path = run / "cluster_map.npz"
    stamp = run / "clusters.parquet.fp"  # the clustering stage's fingerprint covers the manifold
    key = f"{stamp.read_text() if stamp.is_file() else ''}:{seed}"
    if path.is_file():
        saved = np.load(path)
        if str(saved["key"]) == key:
            return saved["index"], saved["xy"]
    index, xy = map_layout(np.load(run / "manifold.npz")["coords"], seed)
    np.savez(path, index=index, xy=xy, key=key)
    return index, xy


def allocation_figure(clusters: list[dict], unit: str = "records", signal: str = "jsd"):
    """CDS per cluster (bars) with its budget allocation and what was selected (lines), in the budget's unit."""
    plt = _pyplot()
    ids = [c["cluster"] for c in clusters]
    fig, ax1 = plt.subplots(figsize=(10, 4))
    ax1.bar(ids, [c["cds"] for c in clusters], color="#c44e52")
    ax1.set_xlabel("cluster")
    ax1.set_ylabel(f"CDS (mean {signal})")
    ax2 = ax1.twinx()
    ax2.plot(ids, [c["allocation"] for c in clusters], "o-", color="#4c72b0", label="allocation")
    chosen = [c["selected_tokens"] if unit == "tokens" else c["selected"] for c in clusters]
    ax2.plot(ids, chosen, "s--", color="#55a868", label="selected")
    ax2.set_ylabel(unit)
    ax2.legend(loc="upper right")
    ax1.set_title("degradation and budget per cluster")
    fig.tight_layout()
    return fig


def rejections_figure(clusters: list[dict]):
    """Share of the records visited in each cluster that the concept filter rejected."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.5))
    rates = [c["rejected"] / max(1, c["rejected"] + c["selected"]) for c in clusters]
    ax.bar([c["cluster"] for c in clusters], rates, color="#8172b2")
    ax.set_xlabel("cluster")
    ax.set_ylabel("rejected / visited")
    ax.set_ylim(0, 1)
    ax.set_title("concept-conflict rejections per cluster")
    fig.tight_layout()
    return fig


def _plots(run: Path, scores: pd.DataFrame, summary: dict, seed: int = 0) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    signal = summary["signal"]
    index, xy = cluster_map(run, seed)
    names = {c["cluster"]: c.get("name", "") for c in summary["clusters"]}
    figures = {
        "cluster_map.png": map_figure(xy, scores["cluster"].to_numpy()[index], scores[signal].to_numpy()[index],
                                      signal, names),
        "allocation.png": allocation_figure(summary["clusters"], summary["budget_unit"], signal),
        "rejections.png": rejections_figure(summary["clusters"]),
    }
    for name, fig in figures.items():
        fig.savefig(run / name, dpi=110)
        _pyplot().close(fig)
    return list(figures)


def cluster_table(summary: dict) -> list[str]:
    """The clusters as Markdown table lines, most degraded first."""
    unit = summary.get("budget_unit", "records")
    lines = [f"| cluster | top concepts | size | CDS ({summary.get('signal', 'jsd')}) | CDS 95% (records scored) | "
             f"allocation ({unit}) | selected | selected tokens | rejected |",
             "|---:|---|---:|---:|---|---:|---:|---:|---:|"]
    for c in sorted(summary["clusters"], key=lambda c: -c["cds"]):
        ci = c.get("cds_ci")
        interval = (f"[{ci[0]:.4f}, {ci[1]:.4f}] ({c['cds_scored']})" if ci else
                    f"({c['cds_scored']})" if "cds_scored" in c else "")
        lines.append(f"| {c['cluster']} | {c.get('name', '')} | {c['size']} | {c['cds']:.4f} | {interval} | "
                     f"{c['allocation']} | {c['selected']} | {c.get('selected_tokens', '')} | {c['rejected']} |")
    return lines


def selection_line(summary: dict) -> str:
    """The budget in its unit and the selection in records and tokens, as one report line."""
    budget = ("none (every record)" if summary.get("every_record") else
              f"{summary['budget']:,} {summary.get('budget_unit', 'records')}")
    return (f"- budget: {budget}; selected {summary['selected']} records, {summary['selected_tokens']:,} tokens "
            f"(prompt + response, {summary['selected_response_tokens']:,} of them response tokens)")


OUTPUTS = ("selected.jsonl", "scores.parquet", "clusters.json", "report.md", "manifest.json", "cluster_map.png")


def artifact_markdown(run: Path) -> str:
    """The Prefect artifact of a selection run: the cluster table and links to its outputs."""
    summary = json.loads((run / "clusters.json").read_text())
    folder = run.resolve()
    source = (f"from {len(summary['clusters'])} clusters" if summary["clusters"]
              else f"({summary['method']} baseline)")
    lines = [f"# paser selection: {summary['selected']} records, {summary['selected_tokens']:,} tokens {source}",
             "", f"Run folder: `{folder}`", "", selection_line(summary), ""]
    lines += (cluster_table(summary) if summary["clusters"] else []) + ["", "## Outputs", ""]
    lines += [f"- [{name}]({(folder / name).as_uri()})" for name in OUTPUTS if (folder / name).exists()]
    return "\n".join(lines) + "\n"


def _manifest_base(settings, data: dict, timings: dict, summary: dict) -> dict:
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": settings.to_dict(),
        "selection": {k: summary[k] for k in ("method", "budget", "budget_unit", "selected", "selected_tokens",
                                              "selected_response_tokens")},
        "data": {k: data[k] for k in ("source", "layout", "records", "fingerprint")}
        | {"rejected_on_load": len(data["rejected"])},
        "packages": package_versions(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},
        "stages": timings,
    }


def selection_ledger(settings, run: Path):
    """What the selection cost (paser.ledger): the embedding model over the instructions, and each
    model of the pair over every scored record's prompt + response (the head on its scored
    positions); stages reused from the run folder are marked so."""
    from paser.ledger import Ledger

    ledger = Ledger()
    timings = json.loads((run / "timings.json").read_text()) if (run / "timings.json").is_file() else {}
    seconds = {stage: t.get("seconds") for stage, t in timings.items()}
    reused = {stage: t.get("reused", False) for stage, t in timings.items()}
    if settings.clustered and settings.embed.precomputed:
        ledger.not_counted.append(f"the embeddings, made elsewhere ({Path(settings.embed.precomputed).name})")
    elif settings.clustered and (run / "embed_cost.json").is_file():
        cost = json.loads((run / "embed_cost.json").read_text())
        ledger.forward("embed", Path(cost["model"]).name, cost["params"], cost["tokens"], 0, seconds.get("embed"),
                       reused.get("embed", False))
    if settings.scored and (run / "degradation.parquet").is_file() and (run / "models.json").is_file():
        scores = pd.read_parquet(run / "degradation.parquet", columns=["n_prompt", "n_response", "n_scored"])
        tokens, positions = int(record_tokens(scores).sum()), int(scores["n_scored"].sum())
        models = json.loads((run / "models.json").read_text())
        for i, which in enumerate(("dense", "pruned")):
            params = models[which].get("flop_params")
            if params:  # the stage's wall time covers both models: it stands on the first line
                ledger.forward("score", models[which]["reference"], params, tokens, positions,
                               seconds.get("score") if i == 0 else None, reused.get("score", False))
    return ledger


def compute_lines(ledger) -> list[str]:
    """The report's compute section: one row per ledger entry, then the total."""
    from paser.ledger import human

    outside = [f"- not counted: {', '.join(ledger.not_counted)}"] if ledger.not_counted else []
    if not ledger.entries:
        return ["", "## Compute", "", "No model ran: the selection used the tokenizer only.", *outside]
    lines = ["", "## Compute", "", "FLOPs by paser's counting rule (forward 2 x non-embedding parameters x tokens + "
             "2 x hidden x vocabulary at the projected positions; paser.ledger).", "",
             "| stage | model | tokens | head positions | FLOPs | seconds | reused |",
             "|---|---|---:|---:|---:|---:|---|"]
    for e in ledger.entries:
        lines.append(f"| {e.stage} | {e.model} | {e.tokens:,} | {e.positions:,} | {human(e.flops)} | "
                     f"{'' if e.seconds is None else f'{e.seconds:.1f}'} | {'yes' if e.reused else 'no'} |")
    return lines + ["", f"- total: {human(ledger.total)} ({human(ledger.spent)} computed in this run)", *outside]


def _baseline_report(settings, run: Path, summary: dict, data: dict, timings: dict) -> Path:
    """manifest.json and a short report.md for the baselines (no clustering; a model only for pruned_loss)."""
    ledger = selection_ledger(settings, run)
    manifest = _manifest_base(settings, data, timings, summary) | {"compute": ledger.to_dict()}
    models = json.loads((run / "models.json").read_text()) if settings.scored else None
    if models is not None:
        manifest["models"] = models
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2))
    how = settings.method.describe(settings)
    used = ("the pruned and dense models' scoring passes, no clustering" if models is not None
            else "the dense model's tokenizer only: no model, clustering or degradation")
    lines = ["# paser selection report (baseline)", "",
             f"- pool: {data['source']} ({data['records']} records, {data['layout']} layout)",
             f"- method: {summary['method']}: {how}; uses {used}", selection_line(summary), ""]
    if models is not None:
        lines[4:4] = [f"- dense: {models['dense']['description']}", f"- pruned: {models['pruned']['description']}"]
    lines += compute_lines(ledger)
    path = run / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_report(settings, run: Path) -> Path:
    """Write manifest.json and report.md (with PNG plots unless ``select.pictures`` is off) for a
    finished selection run."""
    scores = pd.read_parquet(run / "scores.parquet")
    summary = json.loads((run / "clusters.json").read_text())
    data = json.loads((run / "data.json").read_text())
    timings = json.loads((run / "timings.json").read_text())
    if not settings.clustered:
        return _baseline_report(settings, run, summary, data, timings)
    # strat at temperature 0 loads no model
    models = json.loads((run / "models.json").read_text()) if settings.scored else None
    ari = family_ari(run)
    ledger = selection_ledger(settings, run)
    manifest = _manifest_base(settings, data, timings, summary) | {"models": models,
                                                                   "adjusted_rand_index_vs_family": ari,
                                                                   "compute": ledger.to_dict()}
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2))
    plots = _plots(run, scores, summary, settings.select.seed) if settings.select.pictures else []

    status = scores["status"].value_counts().to_dict()
    truncated = int(scores["truncated"].sum())
    method = settings.method
    how = method.describe(settings)
    lines = [
        "# paser selection report", "",
        f"- pool: {data['source']} ({data['records']} records, {data['layout']} layout; "
        f"{len(data['rejected'])} set aside on load)",
        *([f"- dense: {models['dense']['description']}", f"- pruned: {models['pruned']['description']}"]
          if models else ["- models: none loaded (no degradation score needed)"]),
        f"- method: {summary['method']}; degradation signal: {summary['signal']}" + (f"; {how}" if how else ""),
        selection_line(summary),
        f"- clusters: K = {summary['K']} by {summary.get('k_selection', 'knee')} (NMF error curve: knee "
        f"{summary['knee_k']}, K within {settings.cluster.knee_band:.0%} of the knee's height "
        f"{summary.get('knee_band')}; eigengap: "
        f"{summary['eigengap_k']})" + (f": {summary['k_reason']}" if summary.get("k_reason") else ""),
        f"- records cut at the {settings.prompt.cutoff}-token cutoff: {truncated}; without scored tokens: "
        f"{status.get('unscored', 0)}",
        f"- rejected by the {method.filter_name}: {status.get('rejected', 0)}",
    ]
    if ari is not None:
        lines.append(f"- adjusted Rand index of the clusters against the task families: {ari:.3f}")
    lines += ["", "## Clusters", ""] + cluster_table(summary)
    lines += ["", "## Stage times", "", "| stage | seconds | reused |", "|---|---:|---|"]
    for name, t in timings.items():
        lines.append(f"| {name} | {t['seconds']:.1f} | {'yes' if t['reused'] else 'no'} |")
    lines += compute_lines(ledger)
    rejected = scores[scores["status"] == "rejected"].head(10)
    if len(rejected):
        heads = method.rejection_columns
        lines += ["", "## First rejections", "", "| id | cluster | " + " | ".join(heads) + " |",
                  "|---|---:|" + "---|" * len(heads)]
        for row in rejected.itertuples():
            lines.append(f"| {row.id} | {row.cluster} | " + " | ".join(method.rejection_cells(row)) + " |")
    lines += [""] + [f"![{p}]({p})" for p in plots] + [""]
    path = run / "report.md"
    path.write_text("\n".join(lines))
    return path


class RunView:
    """A finished selection run read back from its folder, for notebooks and scripts.

    ``records``: one row per record in pool order (id, instruction, input, response, cluster,
    jsd, ies, status, reason, conflict_a/b, rank, and x, y on the cluster map); ``clusters``: one row per cluster (size,
    cds, allocation, selected, rejected); ``summary``: clusters.json.
    """

    def __init__(self, folder: str | Path):
        from paser.selection.settings import Settings

        self.folder = Path(folder)
        missing = [n for n in ("settings.json", "pool.parquet", "scores.parquet", "clusters.json", "manifold.npz")
                   if not (self.folder / n).is_file()]
        if missing:
            raise DataError(f"{self.folder}: not a finished paser selection run (missing {', '.join(missing)})")
        self.settings = Settings.from_dict(json.loads((self.folder / "settings.json").read_text()),
                                           str(self.folder / "settings.json"))
        self.summary = json.loads((self.folder / "clusters.json").read_text())
        self.clusters = pd.DataFrame(self.summary["clusters"]).set_index("cluster")
        self.coords = np.load(self.folder / "manifold.npz")["coords"]
        pool = pd.read_parquet(self.folder / "pool.parquet", columns=["id", "instruction", "input", "response"])
        scores = pd.read_parquet(self.folder / "scores.parquet")
        records = pool.merge(scores, on="id", how="left", validate="one_to_one")
        index, xy = cluster_map(self.folder, self.settings.select.seed)
        records["x"], records["y"] = np.nan, np.nan  # records left off a sampled map have no position
        records.loc[index, "x"], records.loc[index, "y"] = xy[:, 0], xy[:, 1]
        self.records = records

    def map_figure(self):
        signal = self.summary.get("signal", "jsd")
        shown = self.records.dropna(subset=["x"])
        names = {c["cluster"]: c.get("name", "") for c in self.summary["clusters"]}
        return map_figure(shown[["x", "y"]].to_numpy(), shown["cluster"], shown[signal], signal, names)

    def allocation_figure(self):
        return allocation_figure(self.summary["clusters"], self.summary.get("budget_unit", "records"),
                                 self.summary.get("signal", "jsd"))

    def rejections_figure(self):
        return rejections_figure(self.summary["clusters"])

    def clusters_by_degradation(self) -> list[int]:
        """Cluster ids, most degraded (highest CDS) first."""
        return [int(c) for c in self.clusters.sort_values("cds", ascending=False).index]

    def examples(self, cluster: int, n: int = 3) -> pd.DataFrame:
        """The ``n`` most degraded records of ``cluster``."""
        rows = self.records[self.records["cluster"] == cluster]
        return rows.sort_values("jsd", ascending=False).head(n)[["id", "instruction", "response", "jsd", "status"]]

    def rejected(self) -> pd.DataFrame:
        """Records the concept filter rejected, with the two concepts whose conflict rejected them."""
        rows = self.records[self.records["status"] == "rejected"]
        return rows[["id", "cluster", "instruction", "concepts", "conflict_a", "conflict_b"]]

    def reselect(self, budget: float | int | str):
        """Selection at another budget from the saved scores and clusters (no model, writes nothing)."""
        from paser.selection.runfolder import selection_embeddings, selection_table

        return self.settings.method.pick(self.settings, selection_table(self.settings, self.folder)[1], budget,
                                         selection_embeddings(self.settings, self.folder))


def load_run(folder: str | Path) -> RunView:
    """Read a finished ``paser select`` run folder."""
    return RunView(folder)
