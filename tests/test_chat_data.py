"""Conversation pools: chat ``messages`` and ShareGPT ``conversations`` in every file format, the
multi-turn rule, system messages, bad turns, the command-line field map, and a selection written
back in the conversation layout."""

from __future__ import annotations

import json

import pytest

from paser.data.pools import load_pool, parse_fields, write_jsonl
from paser.data.prompts import format_prompt
from paser.data.suite import generate_suite
from paser.errors import DataError

SYSTEM = "You are a careful assistant."


def chat_rows(n: int = 12, seed: int = 4) -> list[dict]:
    """Suite records as conversations: every third with a system message, every fourth with an
    earlier exchange before the final question."""
    rows = []
    for i, r in enumerate(generate_suite(n, seed=seed)):
        question = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
        turns = [{"role": "system", "content": SYSTEM}] if i % 3 == 0 else []
        if i % 4 == 0:
            turns += [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi! How can I help?"}]
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": r["output"]}]
        rows.append({"messages": turns, "source": "suite"})
    return rows


def sharegpt(rows: list[dict]) -> list[dict]:
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"conversations": [{"from": speaker[t["role"]], "value": t["content"]} for t in r["messages"]]}
            for r in rows]


def _write(path, rows, kind):
    if kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "jsonl":
        write_jsonl(path, rows)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("layout", ["messages", "sharegpt"])
@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "datasets"])
def test_conversations_in_every_format(tmp_path, layout, kind):
    rows = chat_rows()
    data = rows if layout == "messages" else sharegpt(rows)
    pool = load_pool(_write(tmp_path / f"pool.{kind}", data, kind))
    assert pool.layout == layout and len(pool) == len(rows) and not pool.rejected
    first, multi = pool.records[0], pool.records[4]
    assert first.context == ({"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello."},
                             {"role": "assistant", "content": "Hi! How can I help?"})
    assert first.instruction == rows[0]["messages"][-2]["content"]
    assert first.response == rows[0]["messages"][-1]["content"]
    assert first.input == f"System: {SYSTEM}\n\nUser: Hello.\n\nAssistant: Hi! How can I help?"
    assert multi.context[0]["role"] == "user" and len(multi.context) == 2  # no system message on record 4
    assert pool.records[1].context == () and pool.records[1].input == ""
    assert pool.records[0].fields == data[0]  # the record as read, turns included, for writing back


def test_the_last_assistant_turn_is_the_response(tmp_path):
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
             {"role": "user", "content": "never answered"}]
    pool = load_pool(_write(tmp_path / "p.jsonl", [{"messages": turns}], "jsonl"))
    record = pool.records[0]
    assert (record.instruction, record.response) == ("c", "d")
    assert record.context == tuple(turns[:2])


def test_conversations_without_a_sample_are_set_aside_and_counted(tmp_path):
    rows = chat_rows(4) + [{"messages": [{"role": "user", "content": "no answer"}]},
                           {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]}]
    path = _write(tmp_path / "p.jsonl", rows, "jsonl")
    pool = load_pool(path)
    assert len(pool) == 4 and [(r.index, r.reason) for r in pool.rejected] == [
        (4, "no assistant turn"), (5, "no user turn before the last assistant turn")]
    with pytest.raises(DataError, match="record 4: no assistant turn"):
        load_pool(path, strict=True)


@pytest.mark.parametrize("turn,message", [
    ({"role": "tool", "content": "42"}, r"record 0: messages\[1\]: unknown speaker 'tool'"),
    ({"role": "user"}, r"record 0: messages\[1\] needs 'role' and 'content'"),
    ({"role": "user", "content": [{"type": "image"}]}, r"messages\[1\].content is list, expected a string"),
    ("hello", r"messages\[1\] is str"),
])
def test_bad_turns_name_the_record_and_the_turn(tmp_path, turn, message):
    rows = [{"messages": [{"role": "user", "content": "q"}, turn, {"role": "assistant", "content": "a"}]}]
    with pytest.raises(DataError, match=message):
        load_pool(_write(tmp_path / "p.jsonl", rows, "jsonl"))
    with pytest.raises(DataError, match="field 'messages' is str"):
        load_pool(_write(tmp_path / "q.jsonl", [{"messages": "hi"}], "jsonl"))


def test_field_map_from_the_command_line(tmp_path):
    assert parse_fields("instruction=question, response=answer") == {"instruction": "question", "response": "answer"}
    with pytest.raises(DataError, match="ROLE=FIELD"):
        parse_fields("instruction")
    rows = [{"question": r["instruction"], "answer": r["output"]} for r in generate_suite(5, seed=2)]
    path = _write(tmp_path / "qa.jsonl", rows, "jsonl")
    with pytest.raises(DataError, match="--fields"):
        load_pool(path)
    pool = load_pool(path, field_map=parse_fields("instruction=question,response=answer"))
    assert pool.records[2].instruction == rows[2]["question"]
    dialog = [{"dialog": r["messages"]} for r in chat_rows(3)]
    pool = load_pool(_write(tmp_path / "d.jsonl", dialog, "jsonl"), field_map=parse_fields("messages=dialog"))
    assert pool.records[0].context[0]["role"] == "system"


def test_chat_template_reads_every_turn(tmp_path, tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    record = load_pool(_write(tmp_path / "p.jsonl", chat_rows(1), "jsonl")).records[0]
    prompt = format_prompt(record, "chat", tok)
    assert prompt == (f"<system>{SYSTEM}<user>Hello.<assistant>Hi! How can I help?<user>{record.instruction}"
                      "<assistant>")
    assert format_prompt(record, "alpaca").count(f"System: {SYSTEM}") == 1


def test_selection_of_a_chat_pool_is_written_back_in_its_layout(tiny_pair, tmp_path):
    from paser.selection.pipeline import run_selection
    from paser.selection.settings import Settings

    rows = chat_rows(48)
    path = _write(tmp_path / "chat.jsonl", rows, "jsonl")
    dense, pruned = tiny_pair
    run = run_selection(Settings.load(None, {"select": {"data": str(path), "dense": dense, "pruned": pruned,
                                                        "budget": 12, "out": str(tmp_path / "run"),
                                                        "progress": False},
                                             "cluster": {"k_max": 6}}))
    selected = [json.loads(line) for line in (run / "selected.jsonl").read_text().splitlines()]
    assert len(selected) == 12
    originals = {json.dumps(r["messages"]) for r in rows}
    assert all(json.dumps(s["messages"]) in originals and s["source"] == "suite" for s in selected)
    assert json.loads((run / "data.json").read_text())["layout"] == "messages"


def _cache_hub_dataset(home, repo: str, rows: list[dict]) -> None:
    """Put ``rows`` into the datasets cache under ``home`` as the Hugging Face dataset ``repo``
    would be after one online load (the layout datasets reads offline)."""
    import shutil

    from datasets.packaged_modules.json.json import Json

    owner, name = repo.split("/")
    source = write_jsonl(home / "src" / "train.jsonl", rows)
    builder = Json(cache_dir=str(home / "build"), dataset_name=name, data_files={"train": str(source)}, hash="0")
    builder.download_and_prepare()
    shutil.copytree(builder.cache_dir, home / "datasets" / f"{owner}___{name}" / "default" / "0.0.0" / "0")


def test_hugging_face_dataset_ids_from_the_cache(tmp_path, monkeypatch):
    import datasets

    from paser.data.pools import hub_id

    assert hub_id("tatsu-lab/alpaca") and hub_id("imdb")
    assert not hub_id("pool.json") and not hub_id("runs/a/b") and not hub_id("./x") and not hub_id("/abs")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    rows = chat_rows(6)
    _cache_hub_dataset(tmp_path, "acme/chats", rows)
    pool = load_pool("acme/chats")
    assert pool.layout == "messages" and len(pool) == 6 and pool.records[0].fields == rows[0]
    with pytest.raises(DataError, match=r"acme/chats: Unknown split \"test\""):
        load_pool("acme/chats", split="test")
    with pytest.raises(DataError, match=r"acme/missing: no such file or folder, and no Hugging Face dataset"):
        load_pool("acme/missing")
    from paser.selection.configs import SelectConfig
    from paser.selection.runfolder import data_fingerprint

    first = data_fingerprint(SelectConfig(data="acme/chats"))
    assert first == data_fingerprint(SelectConfig(data="acme/chats")) and len(first) == 16
    with pytest.raises(DataError, match="acme/missing"):
        data_fingerprint(SelectConfig(data="acme/missing"))
