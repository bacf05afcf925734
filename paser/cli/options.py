"""Command-line options built from the stage configs: an option is a config field, named after it
(or as the table says), its type from the field's type and its help the field's docstring, so every
option is documented once, where the setting lives. A command declares which fields it offers;
``command`` turns that table into the Typer command's signature and hands the body the values
given, by config section (None where an option was not given, so a YAML file's value stands).

Typer (click underneath) builds a CLI from a function signature; the signature here is made from
the configs instead of written out (as litgpt does with jsonargparse), which keeps Typer's help,
completion and error messages and adds no dependency.

    python -c "from paser.cli.options import field_docs; from paser.recovery import RecoverConfig; \
print(field_docs(RecoverConfig)['seed'])"
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import typer

from paser.cli.app import fail
from paser.comparison.config import CompareConfig
from paser.config import concerns, hint_parts, key_hint
from paser.data.prompts import PromptFormat
from paser.evaluation.config import EvalConfig
from paser.recovery.config import RecoverConfig
from paser.selection.configs import STAGE_CONFIGS


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """Each key's docstring (the string right below its annotation in the body of the class that
    declares it: ``cls``, or a concern whose keys its section writes flat), its lines joined."""
    docs = {}
    for owner in {cls: None} | dict.fromkeys(concerns(cls).values()):
        body = ast.parse(textwrap.dedent(inspect.getsource(owner))).body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@dataclass
class Opt:
    """One option: config field ``field`` of section ``section``. ``flag``: the option's name(s) when
    not ``--field-name`` (``--x/--no-x`` for a flag pair); ``convert``: text to the field's value."""

    section: str
    field: str
    flag: str | None = None
    convert: Callable[[Any], Any] | None = None
    kind: Any = None  # the option's type when the field's does not fit a command line (text parsed by convert)

    @property
    def param(self) -> str:
        return f"{self.section}__{self.field}"


def _cli_type(hint):
    """The command-line type of a field's type hint: choices and unions of number and text are text."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        return _cli_type(kinds[0]) if len(kinds) == 1 else str
    if origin is typing.Literal:
        return str
    if origin is list:
        return list[args[0]]
    return hint


def option(spec: Opt, configs: dict[str, type]) -> inspect.Parameter:
    cls = configs[spec.section]
    hint = key_hint(cls, spec.field)
    kind = spec.kind or _cli_type(hint)
    flags = [spec.flag] if spec.flag else [f"--{spec.field.replace('_', '-')}"]
    info = typer.Option(*flags, help=field_docs(cls).get(spec.field))
    return inspect.Parameter(spec.param, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[kind | None, info])


REQUIRED = inspect.Parameter.empty  # the default of an argument or option that must be given


def plain(name: str, kind, info, default=None) -> inspect.Parameter:
    """An option or argument that is not a config field (``--config``, ``--flow``, a model)."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info])


def flow_option() -> inspect.Parameter:
    return plain("flow", bool, typer.Option("--flow/--no-flow", help="Run through the command's Prefect flow (seen "
                                            "in the Prefect UI) instead of in this process; scoring or arms on Dask or "
                                            "Ray always do."), False)


TRUST_HELP = ("Unpickle whole a pickle that paser's restricted reader refuses (it can run code hidden in the file); "
              "LLM-Pruner checkpoints need no flag.")


def trust_option() -> inspect.Parameter:
    return plain("trust_pickle", bool, typer.Option(help=TRUST_HELP), False)


def config_option(sections: str) -> inspect.Parameter:
    return plain("config", Path | None, typer.Option(help=f"YAML settings ({sections}); options given here "
                                                      "override it."))


def command(app: typer.Typer, name: str, specs: list[Opt], configs: dict[str, type],
            before: list[inspect.Parameter] = (), after: list[inspect.Parameter] = ()):
    """Register ``body(values, **rest)`` as command ``name``: ``before`` (arguments, then options),
    the config options of ``specs`` and ``after`` make its signature; ``values`` maps each section
    to the fields given (converted), ``rest`` holds the other options."""
    def register(body):
        params = [*before, *(option(s, configs) for s in specs), *after]

        def run(**given):
            values: dict[str, dict] = {section: {} for section in configs}
            for spec in specs:
                value = given.pop(spec.param)
                if value is not None and spec.convert is not None:
                    try:
                        value = spec.convert(value)
                    except ValueError as err:  # the user's text: one line and status 2, as every error the user fixes
                        raise fail(err) from None
                values[spec.section][spec.field] = value
            return body(values, **given)

        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = {}
        run.__doc__ = body.__doc__
        run.__name__ = name
        app.command(name)(run)
        return body

    return register


def configuration_reference() -> str:
    """docs/configuration.md: every section of a paser YAML file, each key with its type, default
    and docstring (the same text as the command-line help), read from the configs themselves."""
    sections = {"prompt": PromptFormat, **STAGE_CONFIGS, "recover": RecoverConfig, "evaluate": EvalConfig,
                "compare": CompareConfig}
    lines = ["# Configuration reference", "",
             "Every setting, by the section of a paser YAML file it lives in (`paser select --config FILE`; the",
             "`prompt` section serves every command: scoring, token budgets, recovery and evaluation read one",
             "prompt format; the `recover` and `evaluate` sections serve `paser recover`, `paser evaluate` and",
             "`paser run`; `compare` serves `paser compare`, with the others as the recipe every arm shares).",
             "Generated from the configs by `paser.cli.options.configuration_reference`; the command-line options",
             "carry the same text. Unknown keys and wrong types are errors.", ""]
    for name, cls in sections.items():
        docs = field_docs(cls)
        lines += [f"## `{name}`", "", " ".join((cls.__doc__ or "").split()), ""]
        # a config made of concerns (recover): one table per concern (its attribute), then its own keys
        held = concerns(cls)
        titles = {concern: f"### `{concern.__name__}` (`{cls.__name__}.{attr}` in Python)"
                  for attr, concern in held.items()}
        for owner, title in (titles | {cls: f"### `{cls.__name__}`"}).items():
            declared = [f for f in fields(owner) if f.name not in held  # a section of its own is listed there
                        and (f.name not in sections or f.name == name)]
            if held:
                about = " ".join((owner.__doc__ or "").split()) if owner is not cls else "Its own keys."
                lines += [title, "", about, ""]
            lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
            hints = typing.get_type_hints(owner)
            for f in declared:
                default = f.default if f.default is not MISSING else f.default_factory()
                kind = " or ".join(hint_parts(hints[f.name]))
                lines.append(f"| `{f.name}` | {kind} | `{default!r}` | {docs.get(f.name, '').replace('|', 'or')} |")
            lines.append("")
    return "\n".join(lines)
