"""Instruction pools: every layout and format reads, every bad input is named precisely."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from paser.data.pools import FieldMap, load_pool, read_rows, read_text_samples
from paser.errors import DataError

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue", "extra": 7},
]
DOLLY = [{"instruction": "Summarise.", "context": "Long text.", "response": "Short.", "category": "summarization"}]
LAMINI = [{"instruction": "Say hi.", "response": "Hi."}]


def _write(tmp_path, name, rows):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows))
    elif name.endswith(".csv"):
        pd.DataFrame(rows).to_csv(path, index=False)
    elif name.endswith(".parquet"):
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("name", ["pool.json", "pool.jsonl", "pool.csv", "pool.parquet"])
def test_formats_read_alpaca(tmp_path, name):
    pool = load_pool(_write(tmp_path, name, ALPACA))
    assert pool.layout == "alpaca" and len(pool) == 2
    first = pool.records[0]
    assert (first.instruction, first.input, first.response) == ("Add the numbers.", "2 and 3", "5")
    assert set(pool.records[1].fields) >= {"instruction", "input", "output"}


def test_datasets_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list(DOLLY).save_to_disk(str(tmp_path / "ds"))
    pool = load_pool(tmp_path / "ds")
    assert pool.layout == "dolly" and pool.records[0].input == "Long text."
    assert pool.records[0].fields["category"] == "summarization"


def test_lamini_and_field_map(tmp_path):
    assert load_pool(_write(tmp_path, "l.jsonl", LAMINI)).layout == "lamini"
    rows = [{"question": "Why?", "answer": "Because.", "uid": "q1"}]
    pool = load_pool(_write(tmp_path, "c.json", rows),
                     field_map={"instruction": "question", "response": "answer", "id": "uid"})
    assert pool.records[0].id == "q1" and pool.records[0].response == "Because."


def test_ids_are_stable_and_given_ids_kept(tmp_path):
    path = _write(tmp_path, "p.json", ALPACA + [dict(ALPACA[0])])
    ids = [r.id for r in load_pool(path).records]
    assert ids == [r.id for r in load_pool(path).records]
    assert ids[2] == f"{ids[0]}-2"  # an exact duplicate keeps a distinct, stable id
    given = load_pool(_write(tmp_path, "g.json", [dict(ALPACA[0], id="a1")]))
    assert given.records[0].id == "a1"


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.json: no such file"):
        load_pool(tmp_path / "nope.json")


def test_malformed_json_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]')
    with pytest.raises(DataError, match=r"bad.json: malformed JSON at line 3"):
        load_pool(path)


def test_malformed_jsonl_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: malformed JSON"):
        load_pool(path)


def test_missing_field_names_record_and_field(tmp_path):
    path = _write(tmp_path, "p.json", [ALPACA[0], {"instruction": "x", "input": ""}])
    with pytest.raises(DataError, match=r"p.json: record 1: missing field 'output'"):
        load_pool(path, layout="alpaca")


def test_non_string_value(tmp_path):
    path = _write(tmp_path, "p.json", [ALPACA[0], {"instruction": "x", "input": "", "output": 42}])
    with pytest.raises(DataError, match=r"record 1: field 'output' is int, expected a string"):
        load_pool(path)


def test_empty_texts_rejected_with_count_or_strict_error(tmp_path):
    rows = ALPACA + [{"instruction": " ", "input": "", "output": "x"}, {"instruction": "y", "input": "", "output": ""}]
    path = _write(tmp_path, "p.json", rows)
    pool = load_pool(path)
    assert len(pool) == 2 and [r.reason for r in pool.rejected] == ["empty instruction", "empty response"]
    assert "2 rejected" in pool.summary()
    with pytest.raises(DataError, match=r"record 2: empty instruction \(strict mode refuses it\)"):
        load_pool(path, strict=True)


def test_duplicate_ids(tmp_path):
    path = _write(tmp_path, "p.json", [dict(ALPACA[0], id="x"), dict(ALPACA[1], id="x")])
    with pytest.raises(DataError, match=r"records 0 and 1 have the same id 'x'"):
        load_pool(path)


def test_empty_pool(tmp_path):
    with pytest.raises(DataError, match=r"empty.json: the pool is empty"):
        load_pool(_write(tmp_path, "empty.json", []))
    with pytest.raises(DataError, match=r"the pool is empty \(1 records rejected"):
        load_pool(_write(tmp_path, "e2.json", [{"instruction": "", "input": "", "output": ""}]))


def test_unknown_layout_and_bad_field_map(tmp_path):
    path = _write(tmp_path, "p.json", [{"q": "a", "a": "b"}])
    with pytest.raises(DataError, match=r"match no known layout"):
        load_pool(path)
    with pytest.raises(DataError, match=r"unknown key\(s\) \['answer'\]"):
        load_pool(path, field_map={"instruction": "q", "answer": "a"})
    assert FieldMap.for_layout("dolly").input == "context"


def test_not_utf8(tmp_path):
    path = tmp_path / "p.json"
    path.write_bytes(b"\xff\xfe[]")
    with pytest.raises(DataError, match="not UTF-8"):
        load_pool(path)
    lines = tmp_path / "p.jsonl"  # JSON Lines are read a line at a time: the line is named
    lines.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "b"}\n')
    with pytest.raises(DataError, match=r"p.jsonl: line 2: not UTF-8"):
        load_pool(lines)
    blank = tmp_path / "blank.txt"  # neither a JSON array nor records
    blank.write_text("\n\n")
    assert read_rows(blank) == []


def test_text_samples(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("one\n\n\ntwo\nlines\n")
    assert read_text_samples(path) == ["one", "two\nlines"]
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(DataError, match="contains no text"):
        read_text_samples(tmp_path / "e.txt")


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_a_pool_tokenised_a_list_at_a_time_gives_each_records_own_ids(tiny_tokenizer, template, monkeypatch):
    """Token counting, scoring and training tokenise lists of records; each must get what it gets
    alone, across batch borders and the cutoff."""
    import paser.data.prompts as prompts
    from paser.data.suite import suite_pool

    monkeypatch.setattr(prompts, "TOKENIZER_BATCH", 7)
    if template == "chat":
        monkeypatch.setattr(tiny_tokenizer, "chat_template", "{% for m in messages %}<{{ m['content'] }}>{% endfor %}",
                            raising=False)
    records = suite_pool(30, seed=3).records
    for cutoff in (12, 256):
        together = prompts.tokenize_examples(tiny_tokenizer, records, template, cutoff)
        alone = []
        for r in records:  # the rule, record by record
            prompt = tiny_tokenizer(prompts.format_prompt(r, template, tiny_tokenizer))["input_ids"]
            response = tiny_tokenizer(r.response, add_special_tokens=False)["input_ids"]
            ids = prompt + response + [tiny_tokenizer.eos_token_id]
            alone.append((ids[:cutoff], min(len(prompt), cutoff), min(len(ids), cutoff) - min(len(prompt), cutoff),
                          len(ids) > cutoff))
        assert together == alone
        # the token count keeps only the counts, the same ones
        from paser.data.prompts import PromptFormat
        from paser.selection.degradation import token_table

        table = token_table(tiny_tokenizer, records, PromptFormat(template, cutoff))
        assert list(zip(table["n_prompt"], table["n_response"], table["truncated"])) == [a[1:] for a in alone]
        assert list(table["id"]) == [r.id for r in records]
    assert any(t for *_, t in prompts.tokenize_examples(tiny_tokenizer, records, template, 12))  # the cutoff bit
