import pytest

from lora_helpers.files import atomic_write


def test_atomic_write_replaces_the_file_in_one_rename(tmp_path):
    path = tmp_path / "sub" / "weights.bin"
    with atomic_write(path) as tmp:
        assert tmp.parent == path.parent and tmp != path
        tmp.write_bytes(b"new")
        assert not path.exists()  # nothing at the destination until the block ends
    assert path.read_bytes() == b"new"
    assert [p.name for p in path.parent.iterdir()] == ["weights.bin"]


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_write(path) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
