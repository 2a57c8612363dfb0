import pytest

from alignment.data import DataError, load_prompts, prompt_id


def test_jsonl_csv_parquet_read_the_same(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["What is AI?", "Name a fruit.", "What is AI?"]  # duplicate dropped
    (tmp_path / "p.jsonl").write_text("".join(f'{{"text": "{t}"}}\n' for t in texts) + "\n")
    (tmp_path / "p.csv").write_text("text\n" + "\n".join(texts) + "\n")
    pq.write_table(pa.table({"text": texts}), tmp_path / "p.parquet")
    results = [load_prompts(str(tmp_path / f"p.{ext}"), field="text") for ext in ("jsonl", "csv", "parquet")]
    assert results[0] == results[1] == results[2]
    assert [r["prompt"] for r in results[0]] == texts[:2]
    assert results[0][0]["prompt_id"] == prompt_id("What is AI?") and results[0][0]["source"] == "seed"


def test_limit(tmp_path):
    (tmp_path / "p.jsonl").write_text("".join(f'{{"prompt": "q{i}"}}\n' for i in range(5)))
    assert len(load_prompts(str(tmp_path / "p.jsonl"), limit=2)) == 2


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "ok"}\n{"prompt": "bad\n', ":2: invalid JSON"),
        ('{"prompt": "ok"}\n\n["a list"]\n', ":3: expected a JSON object"),
        ('{"question": "x"}\n', ":1: missing field 'prompt'"),
        ('{"prompt": 3}\n', ":1: field 'prompt' must be a string"),
        ('{"prompt": "  "}\n', ":1: field 'prompt' is empty"),
        ("", "no prompts"),
    ],
)
def test_bad_prompt_files_name_file_and_line(tmp_path, content, message):
    assert_bad_prompt_file(tmp_path / "p.jsonl", content, message)


@pytest.mark.parametrize("content, message", [
    ('prompt\n"What is AI?\n"unterminated\n', ":2: invalid CSV, unterminated quoted field"),
    ('prompt\nok\n"open to the end\nmore\n', ":3: invalid CSV, unterminated quoted field"),
    ("prompt\nfine\nnul\x00byte\n", ":3: NUL byte"),
])
def test_malformed_csv_names_file_and_line(tmp_path, content, message):
    assert_bad_prompt_file(tmp_path / "p.csv", content, message)


def assert_bad_prompt_file(path, content, message):
    """Loading ``content`` from ``path`` is a DataError naming the file and ``message``."""
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_prompts(str(path))
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_prompts(str(tmp_path / "nope.jsonl"))
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="not UTF-8"):
        load_prompts(str(tmp_path / "bin.jsonl"))
    with pytest.raises(DataError, match="is a directory"):
        load_prompts(str(tmp_path))
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="parquet"):
        load_prompts(str(tmp_path / "x.parquet"))


def test_csv_rows_carry_their_line_numbers(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt,other\n"multi\nline",1\n,2\n')
    with pytest.raises(DataError, match=r"p.csv:4: field 'prompt' is empty"):
        load_prompts(str(path))


def test_non_regular_files_are_refused_at_once(tmp_path):
    import os
    import time

    fifo = tmp_path / "p.jsonl"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(DataError, match="not a regular file"):
        load_prompts(str(fifo))  # a read would block forever: no writer
    assert time.monotonic() - started < 5
    with pytest.raises(DataError, match="/dev/zero: not a regular file"):
        load_prompts("/dev/zero")
