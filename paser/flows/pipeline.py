"""``paser run`` as a Prefect flow to deploy: the recipe of ``paser.api.run``, each step (prune,
select, recover, evaluate dense, pruned and recovered) a subflow of this one.

Run folder: pruned/ (when paser prunes), select/ (a selection run folder), recover/ (adapter,
logs), eval/{dense,pruned,recovered}/ and run.md comparing the three.
"""

from __future__ import annotations

from prefect import flow

from paser.api import run_recipe


@flow(name="paser-run")
def pipeline_flow(dense: str | None = None, pruned: str | None = None, data: str | None = None,
                  budget: str | None = None, out: str = "runs/run", config: str | None = None,
                  overrides: dict | None = None, trust_pickle: bool = False) -> str:
    """Prune ``dense`` (unless ``pruned`` is given), select ``budget`` records of ``data``, LoRA-recover
    the pruned model on them, and evaluate dense, pruned and recovered models alike; returns the
    run folder. Models left as None come from the config's ``select`` section, else the defaults.

    ``config`` is one YAML file for every step (sections of paser select, plus prune, recover and
    evaluate); ``overrides`` sets any key as ``{section: {key: value}}``; the named arguments win.
    """
    named = {"dense": dense, "pruned": pruned, "data": data, "budget": budget, "out": out,
             "trust_pickle": trust_pickle}
    return str(run_recipe(config, dict(overrides or {}) | {k: v for k, v in named.items() if v is not None},
                          flow=True).out)
