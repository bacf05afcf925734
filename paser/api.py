"""``paser.select``: the main job, with the same arguments as ``paser select``.

    python -c "import paser; print(paser.select(budget=0.2, out='runs/select'))"
"""

from __future__ import annotations

from pathlib import Path

from paser.errors import ConfigError
from paser.selection.pipeline import preflight, run_selection
from paser.selection.settings import build_settings


def select(data: str | None = None, dense: str | None = None, pruned: str | None = None,
           prune_ratio: float | None = None, budget: str | float | int | None = None, out: str | None = None,
           config: str | Path | None = None, trust_pickle: bool | None = None, seed: int | None = None,
           engine: str | None = None, address: str | None = None, workers: int | None = None,
           use_flow: bool = True, overrides: dict | None = None) -> Path:
    """Run PASER selection and return the run folder.

    Every argument left as None keeps the value from ``config`` (a YAML file with sections
    select/embed/manifold/cluster/score/allocate/concepts/prune/distribute), else the default: a
    bare ``select()`` runs the embedded default (the generated capability suite, the bundled
    SmolLM2-135M-Instruct and its 25% paser-pruned twin, 20% budget). ``engine`` (local, dask,
    ray), ``address`` and ``workers`` say where the degradation shards run. ``overrides`` sets any
    other key as ``{section: {key: value}}``. ``use_flow=False`` runs the stages in this process
    without Prefect (no caching in Prefect's result store, no distributed scoring).
    """
    args = dict(data=data, dense=dense, pruned=pruned, prune_ratio=prune_ratio, budget=budget, out=out,
                config=str(config) if config is not None else None, trust_pickle=trust_pickle, seed=seed,
                engine=engine, address=address, workers=workers, overrides=overrides)
    settings = build_settings(**args)
    preflight(settings)
    if not use_flow:
        if settings.distribute.engine != "local":
            raise ConfigError(f"engine {settings.distribute.engine!r} runs through the Prefect flow; "
                              "drop use_flow=False (--no-flow)")
        return run_selection(settings)
    from flows.selection import selection_flow

    return Path(selection_flow(**args))
