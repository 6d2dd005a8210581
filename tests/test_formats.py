"""Every input format is recognised, records are named when bad, and QA pairs group by clip."""

from __future__ import annotations

import json
import os

import pytest

from conftest import write_json, write_jsonl
from gama_ds.data.formats import InputError, group_by_clip, read_inputs


def test_gama_records_default_optional_fields_and_keep_extras(tmp_path):
    path = write_json(
        tmp_path / "g.json",
        [
            {"audio_id": "x.wav", "instruction": "What?", "output": "A dog."},
            {
                "audio_id": "x.wav",
                "instruction": "Where?",
                "input": "ctx",
                "output": "Park.",
                "dataset": "as",
                "task": "open",
                "id": 7,
            },
        ],
    )
    records, rejects = read_inputs([path])
    assert rejects == []
    first, second = (r.qa[0] for r in records)
    assert first == {
        "instruction": "What?",
        "input": "",
        "output": "A dog.",
        "dataset": "",
        "task": "",
        "source": f"{path}[0]",
    }
    assert second["input"] == "ctx" and second["dataset"] == "as" and second["extra"] == {"id": 7}
    assert records[0].path == os.path.realpath(tmp_path / "x.wav")


@pytest.mark.parametrize("writer", [write_jsonl, write_json], ids=["jsonl", "json-list"])
def test_audio_question_answer_records(tmp_path, writer):
    path = writer(
        tmp_path / "q.jsonl",
        [
            {"audio": "a.wav", "question": "Q1", "answer": "A1"},
            {"audio": "b.wav", "question": "Q2", "answer": "A2", "task": "t"},
        ],
    )
    records, rejects = read_inputs([path])
    assert not rejects
    assert [(r.audio, r.qa[0]["instruction"], r.qa[0]["output"], r.qa[0]["task"]) for r in records] == [
        ("a.wav", "Q1", "A1", ""),
        ("b.wav", "Q2", "A2", "t"),
    ]
    expected = f"{path}:2" if writer is write_jsonl else f"{path}[1]"
    assert records[1].source == expected


def test_eval_records_expand_every_pair(tmp_path):
    path = write_json(
        tmp_path / "e.json",
        [
            {
                "audio_id": "c.wav",
                "dataset": "compa-r",
                "caption": "rain",
                "timestamp_events": "[0-1] rain",
                "instruction_output": [
                    {"instruction": "I1", "output": "O1"},
                    {"instruction": "I2", "output": "O2", "task": "reasoning"},
                ],
            }
        ],
    )
    (record,), rejects = read_inputs([path])
    assert not rejects
    assert [(q["instruction"], q["output"], q["dataset"], q["task"]) for q in record.qa] == [
        ("I1", "O1", "compa-r", ""),
        ("I2", "O2", "compa-r", "reasoning"),
    ]
    assert record.qa[1]["source"] == f"{path}[0] instruction_output[1]"
    assert record.qa[0]["extra"] == {"caption": "rain", "timestamp_events": "[0-1] rain"}


def test_relative_paths_resolve_against_audio_root_or_the_json_folder(tmp_path):
    sub = tmp_path / "lists"
    sub.mkdir()
    path = write_json(
        sub / "g.json",
        [
            {"audio_id": "clips/a.wav", "instruction": "Q", "output": "A"},
            {"audio_id": "/abs/b.wav", "instruction": "Q", "output": "A"},
        ],
    )
    rel, absolute = read_inputs([path])[0]
    assert rel.path == os.path.realpath(sub / "clips/a.wav") and absolute.path == "/abs/b.wav"
    rooted = read_inputs([path], audio_root=str(tmp_path / "root"))[0]
    assert (
        rooted[0].path == os.path.realpath(tmp_path / "root/clips/a.wav") and rooted[1].path == "/abs/b.wav"
    )


def test_bad_records_are_rejected_with_file_line_and_field(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"audio": "a.wav", "question": "Q", "answer": "A"},
            {"audio": "a.wav", "question": "Q"},
            '{"audio": "a.wav", "question": ',
            {"audio_id": "a.wav", "instruction": "Q", "output": 3},
            {"audio": "a.wav", "audio_id": "a.wav", "question": "Q", "answer": "A"},
            {"question": "Q", "answer": "A"},
            ["not", "an", "object"],
            {"audio_id": "a.wav", "instruction": "   ", "output": "A"},
            {"audio_id": "a.wav", "instruction_output": [{"instruction": "Q"}]},
        ],
    )
    records, rejects = read_inputs([path])
    assert len(records) == 1
    got = {r.source: r.detail for r in rejects}
    assert all(r.reason == "bad record" for r in rejects)
    assert got == {
        f"{path}:2": "missing field 'answer'",
        f"{path}:3": got[f"{path}:3"],
        f"{path}:4": "field 'output' must be a string, got int",
        f"{path}:5": "has both 'audio' and 'audio_id'; keep one",
        f"{path}:6": "no audio field: expected 'audio_id' (GAMA/LTU) or 'audio' (audio QA)",
        f"{path}:7": "expected a JSON object, got list",
        f"{path}:8": "field 'instruction' is empty",
        f"{path}:9": "instruction_output[0]: missing field 'output'",
    }
    assert got[f"{path}:3"].startswith("invalid JSON at column")
    assert rejects[0].audio == "a.wav"


def test_a_broken_json_list_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"audio_id": "a.wav",\n  "instruction": "Q" "output": "A"}\n]\n')
    with pytest.raises(InputError, match=r"broken.json: line 3 column 22: Expecting .,. delimiter"):
        read_inputs([str(path)])


def test_an_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("\n")
    with pytest.raises(InputError, match="empty.json: empty file"):
        read_inputs([str(path)])


def test_qa_pairs_group_by_clip_across_files_and_spellings(tmp_path):
    first = write_json(
        tmp_path / "a.json",
        [
            {"audio_id": "a.wav", "instruction": "Q1", "output": "A1"},
            {"audio_id": "b.wav", "instruction": "Q2", "output": "A2"},
        ],
    )
    second = write_jsonl(
        tmp_path / "b.jsonl", [{"audio": "./sub/../a.wav", "question": "Q3", "answer": "A3"}]
    )
    clips = group_by_clip(read_inputs([first, second])[0])
    assert [(os.path.basename(c.path), [q["instruction"] for q in c.qa]) for c in clips] == [
        ("a.wav", ["Q1", "Q3"]),
        ("b.wav", ["Q2"]),
    ]


def test_bom_and_unicode_line_separators_are_plain_json(tmp_path):
    listed = tmp_path / "bom.json"
    listed.write_text(
        json.dumps([{"audio": "a.wav", "question": "Q", "answer": "A"}], indent=2), encoding="utf-8-sig"
    )
    lines = tmp_path / "sep.jsonl"
    rows = [{"audio": "a.wav", "question": f"Q{i}\u2028 line\x85 two\x1e", "answer": "A"} for i in range(3)]
    lines.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    records, rejects = read_inputs([str(listed), str(lines)])
    assert rejects == [] and len(records) == 4
    assert [r.source for r in records[1:]] == [f"{lines}:1", f"{lines}:2", f"{lines}:3"]


def test_the_same_input_twice_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"audio": "a.wav", "question": "Q", "answer": "A"}])
    with pytest.raises(InputError, match="given twice"):
        read_inputs([path, str(tmp_path / "." / "q.jsonl")])


def test_an_empty_list_is_an_error(tmp_path):
    with pytest.raises(InputError, match="an empty list"):
        read_inputs([write_json(tmp_path / "e.json", [])])


def test_an_undecodable_path_is_a_bad_record(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", ['{"audio": "a\\udc80.wav", "question": "Q", "answer": "A"}'])
    records, (reject,) = read_inputs([path])
    assert records == [] and reject.detail == "field 'audio' is not a valid UTF-8 path"
