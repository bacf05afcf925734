"""Instruction pools: read, validate and write back records in the user's own layout.

Layouts: Alpaca (``instruction``, ``input``, ``output``), LaMini (``instruction``, ``response``),
Dolly (``instruction``, ``context``, ``response``, ``category``), chat ``messages`` (a list of
``{"role", "content"}`` turns, OpenAI/TRL style), ShareGPT ``conversations`` (``{"from",
"value"}`` turns), or a user ``FieldMap``. Formats: JSON array, JSONL, CSV, Parquet, and
``datasets.save_to_disk`` folders.

A conversation becomes one record: the last assistant turn is the response, the user turn just
before it the instruction, and every turn before that (a system message, earlier exchanges) the
record's ``context``; turns after the last assistant turn have no answer to learn and are not
part of the sample. The prompt template renders the context (see ``paser.data.prompts``).

Every record gets a stable id (its own ``id`` field, else a hash of its content) and keeps all of
its fields, so a selected subset is written back in the input's layout plus paser's fields.
Bad input raises ``DataError`` naming the file, the record and the field; records with an empty
instruction or response are set aside and counted (or refused when ``strict``), never dropped
silently.

    python -c "from paser.data.pools import load_pool; p = load_pool('pool.jsonl'); print(p.summary())"
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from paser.errors import DataError

# layout name -> (instruction field, input field or None, response field)
LAYOUTS: dict[str, tuple[str, str | None, str]] = {
    "alpaca": ("instruction", "input", "output"),
    "dolly": ("instruction", "context", "response"),
    "lamini": ("instruction", None, "response"),
}
# layout name -> the field holding the conversation
CHAT_LAYOUTS: dict[str, str] = {"messages": "messages", "sharegpt": "conversations"}
# turn speaker names (OpenAI "role", ShareGPT "from") -> role
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant"}


@dataclass(frozen=True)
class FieldMap:
    """Which fields of a record hold the instruction, the optional input and the response."""

    instruction: str = "instruction"
    input: str | None = "input"
    response: str = "output"
    id: str | None = "id"
    messages: str | None = None
    """A field holding the whole conversation (chat or ShareGPT turns); when set, instruction,
    input and response come from its turns instead."""

    @classmethod
    def for_layout(cls, layout: str) -> FieldMap:
        if layout in CHAT_LAYOUTS:
            return cls(messages=CHAT_LAYOUTS[layout])
        if layout not in LAYOUTS:
            raise DataError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS) + sorted(CHAT_LAYOUTS)} "
                            "or give a field map")
        ins, inp, resp = LAYOUTS[layout]
        return cls(instruction=ins, input=inp, response=resp)


@dataclass
class Record:
    """One instruction sample; ``fields`` is the record exactly as read (None when a run folder's
    pool was read for its texts alone: ``read_run_pool(..., fields=False)``)."""

    id: str
    instruction: str
    input: str
    response: str
    fields: dict | None
    index: int  # position in the file, 0-based
    context: tuple = ()
    """Conversation turns before the instruction, as {"role", "content"} (system message,
    earlier exchanges); empty for single-turn layouts."""


@dataclass
class Rejected:
    index: int
    id: str
    reason: str


@dataclass
class Pool:
    records: list[Record]
    source: Path | None
    layout: str
    field_map: FieldMap
    rejected: list[Rejected] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def summary(self) -> str:
        src = self.source if self.source else "generated"
        return (f"{src}: {len(self.records)} records ({self.layout} layout)"
                + (f", {len(self.rejected)} rejected" if self.rejected else ""))


# ---------------------------------------------------------------- reading raw rows


def _read_json(path: Path, text: str) -> list:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if isinstance(rows, dict):
        # {"data": [...]} / {"train": [...]} wrappers are common; accept a single list value.
        lists = [v for v in rows.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
        raise DataError(f"{path}: expected a JSON array of records, found an object with keys {sorted(rows)[:6]}")
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of records, found {type(rows).__name__}")
    return rows


def _read_jsonl(path: Path) -> list:
    """The rows of a JSON Lines file, read a line at a time (a file of millions of records is never
    held whole as text beside its rows)."""
    rows = []
    with path.open("rb") as lines:
        for lineno, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}: line {lineno}: not UTF-8 text (byte {err.start} of the line); expected "
                                "JSON, JSONL, CSV or Parquet") from None
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
    return rows


def _starts_like_json_array(path: Path) -> bool:
    """Whether the file's first non-blank character is ``[`` (a JSON array, not JSON Lines)."""
    with path.open("rb") as head:
        while chunk := head.read(4096):
            if chunk.strip():
                return chunk.lstrip()[:1] == b"["
    return False


def _read_table(path: Path, kind: str) -> list:
    try:
        if kind == "csv":
            import pandas as pd

            return pd.read_csv(path, dtype=str, keep_default_na=False).to_dict(orient="records")
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        # a pandas index saved as a column is not a field of the records
        table = table.drop([c for c in table.column_names if c.startswith("__index_level_")])
        return table.to_pylist()  # plain lists and dicts, also for nested turns
    except Exception as err:
        raise DataError(f"{path}: cannot read as {kind.upper()}: {type(err).__name__}: {err}") from None


def _read_datasets_folder(path: Path) -> list:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path}: not a datasets.save_to_disk folder: {type(err).__name__}: {err}") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1 and "train" not in ds:
            raise DataError(f"{path}: dataset has splits {list(ds)}; expected one split or 'train'")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return ds.to_list()


DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".pq", ".txt")


def hub_id(text: str) -> bool:
    """Whether ``text`` reads as a Hugging Face dataset id (``name`` or ``owner/name``) rather than
    a path: no more than one slash, no leading dot or slash, no data-file suffix."""
    text = str(text)
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", text) is not None
            and not text.lower().endswith(DATA_SUFFIXES))


def hub_dataset(name: str, split: str = "train"):
    """The ``split`` of the Hugging Face dataset ``name`` through ``datasets.load_dataset``, which
    works offline from the user's datasets cache; a one-line DataError when it is not there."""
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except ValueError as err:  # an unknown split names the ones there are
        raise DataError(f"{name}: {err}") from None
    except Exception as err:
        cache = datasets.config.HF_DATASETS_CACHE
        raise DataError(f"{name}: no such file or folder, and no Hugging Face dataset of that id in the datasets "
                        f"cache ({cache}; {type(err).__name__}); paser runs offline: load it once with network "
                        f"(datasets.load_dataset({name!r})) or give a file") from None


def read_rows(path: str | Path, split: str = "train") -> list:
    """The raw rows of a file, a datasets folder, or (when no such path exists) the ``split`` of
    a Hugging Face dataset id from the datasets cache, as dicts (not validated)."""
    if not Path(path).expanduser().exists() and hub_id(str(path)):
        return hub_dataset(str(path), split).to_list()
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_datasets_folder(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".parquet", ".pq"):
        return _read_table(path, "csv" if suffix == ".csv" else "parquet")
    try:
        if suffix == ".jsonl" or (suffix != ".json" and not _starts_like_json_array(path)):
            return _read_jsonl(path)
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); expected JSON, JSONL, CSV or Parquet") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror}") from None
    return _read_json(path, text)


def read_text_samples(path: str | Path) -> list[str]:
    """Plain-text samples: one per paragraph (blank-line separated)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read as UTF-8 text: {err}") from None
    samples = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not samples:
        raise DataError(f"{path}: contains no text")
    return samples


# ---------------------------------------------------------------- records


def detect_layout(path: Path, rows: list) -> str:
    first = next((r for r in rows if isinstance(r, dict)), None)
    if first is None:
        raise DataError(f"{path}: no records to detect the layout from")
    keys = set(first)
    for layout, name in CHAT_LAYOUTS.items():
        if name in keys:
            return layout
    if "output" in keys and "instruction" in keys:
        return "alpaca"
    if {"instruction", "context", "response"} <= keys:
        return "dolly"
    if {"instruction", "response"} <= keys:
        return "lamini"
    raise DataError(
        f"{path}: record 0 has fields {sorted(keys)[:8]}, which match no known layout "
        "(alpaca: instruction/input/output; lamini: instruction/response; "
        "dolly: instruction/context/response; chat: messages; sharegpt: conversations); name the fields "
        "with --fields (e.g. --fields instruction=question,response=answer, or --fields messages=dialog) "
        "or select.field_map in a YAML"
    )


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def content_id(instruction: str, input_: str, response: str) -> str:
    digest = hashlib.sha256("\x1f".join((instruction, input_, response)).encode()).hexdigest()
    return digest[:16]


def render_context(context) -> str:
    """Conversation turns as text, one "Role: content" paragraph each (the Alpaca template's
    input, and what embedding reads)."""
    return "\n\n".join(f"{turn['role'].capitalize()}: {turn['content']}" for turn in context)


def conversation(where, i: int, name: str, turns) -> tuple[tuple, str, str] | str:
    """(context, instruction, response) of a conversation (see the module docstring), or the
    reason it has no sample (a string)."""
    if not isinstance(turns, list | tuple):
        raise DataError(f"{where}: record {i}: field '{name}' is {type(turns).__name__}, expected a list of turns")
    parsed = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: record {i}: {name}[{j}] is {type(turn).__name__}, expected an object "
                            "with role/content (or from/value)")
        speaker_key, text_key = ("role", "content") if "role" in turn else ("from", "value")
        speaker, text = turn.get(speaker_key), turn.get(text_key)
        if speaker is None or _is_missing(text):
            raise DataError(f"{where}: record {i}: {name}[{j}] needs 'role' and 'content' (or 'from' and "
                            f"'value'); it has {sorted(turn)[:6]}")
        role = ROLES.get(str(speaker).lower())
        if role is None:
            raise DataError(f"{where}: record {i}: {name}[{j}]: unknown speaker {speaker!r}; paser reads "
                            f"{sorted(ROLES)}")
        if not isinstance(text, str):
            raise DataError(f"{where}: record {i}: {name}[{j}].{text_key} is {type(text).__name__}, expected a "
                            "string (text-only conversations)")
        parsed.append({"role": role, "content": text})
    last = max((j for j, t in enumerate(parsed) if t["role"] == "assistant"), default=None)
    if last is None:
        return "no assistant turn"
    if last == 0 or parsed[last - 1]["role"] != "user":
        return "no user turn before the last assistant turn"
    return tuple(parsed[:last - 1]), parsed[last - 1]["content"], parsed[last]["content"]


def to_records(rows: list, path: Path | None, fmap: FieldMap, strict: bool = False,
               layout: str = "custom") -> Pool:
    """Validate raw rows into records. See the module docstring for what is an error."""
    where = path if path is not None else "<records>"
    records, rejected, seen = [], [], {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{where}: record {i} is a {type(row).__name__}, expected an object with fields")
        values, context, reason = {}, (), None
        if fmap.messages is not None:
            turns = row.get(fmap.messages)
            if _is_missing(turns):
                raise DataError(f"{where}: record {i}: missing field '{fmap.messages}' (the conversation; "
                                f"record has {sorted(row)[:8]})")
            found = conversation(where, i, fmap.messages, turns)
            if isinstance(found, str):
                reason, found = found, ((), "", "")
            context, values["instruction"], values["response"] = found
            values["input"] = render_context(context)
        for role, name, required in (() if fmap.messages is not None else
                                     (("instruction", fmap.instruction, True),
                                      ("input", fmap.input, False),
                                      ("response", fmap.response, True))):
            if name is None:
                values[role] = ""
                continue
            value = row.get(name)
            if _is_missing(value):
                if required:
                    present = sorted(row)[:8]
                    raise DataError(f"{where}: record {i}: missing field '{name}' (the {role}; "
                                    f"record has {present})")
                value = ""
            if not isinstance(value, str):
                raise DataError(f"{where}: record {i}: field '{name}' is {type(value).__name__}, "
                                "expected a string")
            values[role] = value
        given = row.get(fmap.id) if fmap.id else None
        if not _is_missing(given):
            rid = str(given)
            if rid in seen:
                raise DataError(f"{where}: records {seen[rid]} and {i} have the same id {rid!r}")
        else:
            rid = content_id(values["instruction"], values["input"], values["response"])
            # exact duplicate records keep distinct, stable ids by order of appearance
            n = 2
            base = rid
            while rid in seen:
                rid, n = f"{base}-{n}", n + 1
        seen[rid] = i
        empty = [role for role in ("instruction", "response") if not values[role].strip()]
        if empty or reason:
            reason = reason or f"empty {' and '.join(empty)}"
            if strict:
                raise DataError(f"{where}: record {i}: {reason} (strict mode refuses it)")
            rejected.append(Rejected(index=i, id=rid, reason=reason))
            continue
        records.append(Record(id=rid, instruction=values["instruction"], input=values["input"],
                              response=values["response"], fields=dict(row), index=i, context=context))
    if not records:
        detail = f" ({len(rejected)} records rejected: {rejected[0].reason}, ...)" if rejected else ""
        raise DataError(f"{where}: the pool is empty{detail}")
    return Pool(records=records, source=path, layout=layout, field_map=fmap, rejected=rejected)


def load_pool(path: str | Path, layout: str | None = None, field_map: dict | FieldMap | None = None,
              strict: bool = False, split: str = "train") -> Pool:
    """Read and validate an instruction pool.

    ``path``: a file, a datasets folder, or a Hugging Face dataset id (its ``split``, from the
    datasets cache). ``layout``: alpaca, lamini, dolly, messages or sharegpt (detected from the first record when
    omitted); ``field_map``: explicit field names, overriding the layout (keys
    instruction/input/response/id, or messages for a conversation field).
    """
    rows = read_rows(path, split)
    path = Path(path).expanduser()
    if not rows:
        raise DataError(f"{path}: the pool is empty (no records)")
    if field_map is not None:
        fmap = field_map if isinstance(field_map, FieldMap) else _field_map_from_dict(path, field_map)
        name = "custom"
    else:
        name = layout or detect_layout(path, rows)
        fmap = FieldMap.for_layout(name)
    return to_records(rows, path, fmap, strict=strict, layout=name)


def _field_map_from_dict(path: Path, mapping: dict) -> FieldMap:
    known = set(FieldMap.__dataclass_fields__)
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise DataError(f"field map for {path}: unknown key(s) {unknown}; known: {sorted(known)}")
    if "messages" in mapping:
        return FieldMap(**{"id": "id"} | mapping)
    if "instruction" not in mapping or "response" not in mapping:
        raise DataError(f"field map for {path}: needs 'instruction' and 'response' (or 'messages')")
    return FieldMap(**{"input": None, "id": "id"} | mapping)


def parse_fields(text: str) -> dict:
    """``--fields instruction=question,response=answer`` as a field map."""
    mapping = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise DataError(f"--fields {text!r}: expected ROLE=FIELD pairs separated by commas, e.g. "
                            "instruction=question,response=answer")
        mapping[key.strip()] = value.strip()
    return mapping


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Write rows as JSON lines (UTF-8, non-ASCII kept readable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
