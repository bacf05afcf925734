"""Names of a package imported when first used (PEP 562), so that importing the package, or one
light module of it such as its config, does not load torch, scikit-learn or the trainer."""

from __future__ import annotations

import importlib


def lazy_names(package: str, homes: dict[str, str]):
    """``__getattr__`` and ``__dir__`` for ``package``'s ``__init__``: each name of ``homes`` is
    read from its module (``homes[name]``) the first time it is asked for, then kept."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(homes[name]), name)
        namespace[name] = value  # found directly from now on
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(homes))

    return __getattr__, __dir__
