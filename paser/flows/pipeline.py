"""The whole pipeline as one flow: prune (optional) -> select -> recover -> evaluate.

    paser run                                  # the embedded default, end to end

Run folder: pruned/ (when paser prunes), select/ (a selection run folder), recover/ (adapter,
logs), eval/{dense,pruned,recovered}/ and run.md comparing the three.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from paser.config import read_yaml
from paser.evaluation.report import comparison_table
from paser.flows.prune import prune_flow
from paser.flows.recovery import evaluation_flow, recovery_flow
from paser.flows.selection import selection_flow
from paser.ledger import parts_table
from paser.selection.settings import build_settings


@flow(name="paser-run")
def pipeline_flow(dense: str | None = None, pruned: str | None = None, data: str | None = None,
                  budget: str | None = None, out: str = "runs/run", config: str | None = None,
                  overrides: dict | None = None, trust_pickle: bool = False) -> str:
    """Prune ``dense`` (unless ``pruned`` is given), select ``budget`` records of ``data``, LoRA-recover
    the pruned model on them, and evaluate dense, pruned and recovered models alike. Models left
    as None come from the config's ``select`` section, else the defaults.

    ``config`` is one YAML file for every stage (sections of paser select, plus prune, recover and
    evaluate); ``overrides`` sets any key as ``{section: {key: value}}``.
    """
    root = Path(out)
    overrides = {k: dict(v or {}) for k, v in (overrides or {}).items()}
    # the selection's settings, built as every entry point builds them: the models given here, else
    # the config's select section, else the bundled default and paser's own prune of it
    settings = build_settings(data=data, dense=dense, pruned=pruned, budget=budget, out=str(root / "select"),
                              config=config, trust_pickle=trust_pickle,
                              overrides={k: v for k, v in overrides.items() if k not in ("recover", "evaluate")})
    # recover and evaluate are other commands' sections: the config's, with the overrides on top
    sections = {k: dict(v or {}) | overrides.get(k, {}) for k, v in (read_yaml(config) if config else {}).items()}
    sections |= {k: v for k, v in overrides.items() if k not in sections}
    dense, pruned = settings.select.dense, settings.select.pruned
    if pruned is None:
        pruned = str(root / "pruned")
        prune_flow(dense, pruned, config, sections.get("prune"), trust_pickle=trust_pickle)
    run = selection_flow(pruned=pruned, overrides=settings.to_dict())
    # one prompt format: the selection's, recovery's and every evaluation's (the prompt section)
    prompt = {"prompt": settings.to_dict()["prompt"]}
    recovered = recovery_flow(pruned, str(Path(run) / "selected.jsonl"), str(root / "recover"),
                              overrides=dict(sections.get("recover") or {}) | prompt, trust_pickle=trust_pickle).out
    # the held-out suite shares no prompt with the pool selected from; the recovered model's
    # evaluation also reports the share of each family's dense-vs-pruned gap it closed
    evaluate = {"suite_exclude": [run]} | dict(sections.get("evaluate") or {}) | prompt
    references = {"reference_dense": str(root / "eval" / "dense"), "reference_pruned": str(root / "eval" / "pruned")}
    results = {}
    for name, model, adapter in (("dense", dense, None), ("pruned", pruned, None),
                                 ("recovered", pruned, str(Path(recovered) / "adapter"))):
        # how far the pruned and the recovered model's distributions are from the dense one's
        extra = ({} if name == "dense" else {"divergence_from": dense}) | (references if name == "recovered" else {})
        results[name] = evaluation_flow(model, adapter, str(root / "eval" / name), overrides=evaluate | extra,
                                        trust_pickle=trust_pickle)
    recovery = json.loads((Path(recovered) / "recovery.json").read_text())
    selection = json.loads((Path(run) / "manifest.json").read_text())
    parts = {"selection": selection["compute"], "recovery": recovery["compute"]} | {
        f"evaluation of the {name} model": result["compute"] for name, result in results.items()}
    (root / "run.md").write_text("\n".join([comparison_table(results), "## Compute (paser's counting rule, "
                                                                       "paser.ledger)", "", *parts_table(parts), ""]))
    return str(root)

