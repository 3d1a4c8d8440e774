"""The file store: validated before written, ids that cannot name a path, delete, list."""

from __future__ import annotations

import json

import pytest

from workers.store.files import FileContentError, FileNotFound, FileStore, FileTooLargeError, clean_filename

GOOD = b'{"prompt": "1+1=", "completion": "2"}\n\n{"text": "hello"}\n'


def test_a_stored_file_is_listed_read_and_deleted(tmp_path):
    store = FileStore(tmp_path / "files", max_bytes=1 << 20)
    record = store.put(GOOD, "dir/../train.jsonl", "fine-tune")
    assert record.records == 2 and record.bytes == len(GOOD) and record.filename == "train.jsonl"
    assert store.get(record.id) == record and [r.id for r in store.list()] == [record.id]
    assert store.records(record.id)[1] == {"text": "hello"}
    assert store.content_path(record.id).read_bytes() == GOOD
    store.delete(record.id)
    assert store.list() == [] and list((tmp_path / "files").iterdir()) == []
    with pytest.raises(FileNotFound):
        store.get(record.id)


@pytest.mark.parametrize(
    "data, message",
    [
        (GOOD + b"{bad\n", "line 4: invalid JSON"),
        (b'{"messages": [{"role": "user", "content": "x"}]}\n', "line 1: 'messages' has no assistant"),
        (b'{"prompt": "x"}\n', "line 1: 'response' must be a string"),
        (b"", "no records"),
    ],
)
def test_a_bad_file_names_its_line_and_nothing_is_written(tmp_path, data, message):
    store = FileStore(tmp_path / "files", max_bytes=1 << 20)
    with pytest.raises(FileContentError, match=message):
        store.put(data, "x.jsonl", "fine-tune")
    assert not (tmp_path / "files").exists()


def test_limits_and_purposes(tmp_path):
    store = FileStore(tmp_path / "files", max_bytes=16)
    with pytest.raises(FileTooLargeError):
        store.put(GOOD, "x.jsonl", "fine-tune")
    with pytest.raises(FileContentError, match="purpose"):
        FileStore(tmp_path / "files", 1 << 20).put(GOOD, "x.jsonl", "batch")


@pytest.mark.parametrize("file_id", ["../x", "file-../../etc/passwd", "file-" + "A" * 24, "/etc/passwd", ""])
def test_an_id_that_is_not_file_hex_is_never_a_path(tmp_path, file_id):
    (tmp_path / "secret.json").write_text(json.dumps({"id": "x"}))
    store = FileStore(tmp_path / "files", max_bytes=1 << 20)
    for action in (store.get, store.content_path, store.delete, store.records):
        with pytest.raises(FileNotFound, match="not a file id"):
            action(file_id)


def test_filenames_are_shown_never_used():
    assert clean_filename("../../a\x00b.jsonl") == "ab.jsonl"
    assert clean_filename(None) == "upload.jsonl" and len(clean_filename("x" * 999)) == 200
