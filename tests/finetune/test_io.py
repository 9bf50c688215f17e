"""Tests for finetune.io: atomic writes leave the old file or the whole new one, and no temp files."""

from __future__ import annotations

import stat

import pytest

from finetune.io import atomic_open, atomic_write_bytes, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_text_and_bytes(tmp_path) -> None:
    text_file, bytes_file = tmp_path / "a.md", tmp_path / "b.bin"
    atomic_write_text(text_file, "zéro\n")
    atomic_write_bytes(str(bytes_file), b"\x00\x01")  # str paths too
    assert text_file.read_bytes() == "zéro\n".encode("utf-8")
    assert bytes_file.read_bytes() == b"\x00\x01"
    # mkstemp creates 0600; shared run outputs must be readable by others, whatever the umask.
    assert _mode(text_file) == 0o644 and _mode(bytes_file) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md", "b.bin"]


def test_replaces_an_existing_file(tmp_path) -> None:
    path = tmp_path / "results.json"
    atomic_write_text(path, "old, and longer than the new content\n")
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_error_mid_write_keeps_the_old_file_and_no_temp_file(tmp_path) -> None:
    path = tmp_path / "results.png"
    atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError, match="renderer died"):
        with atomic_open(path) as fh:
            fh.write(b"half of a new fi")
            raise RuntimeError("renderer died")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.png"]


def test_interrupt_mid_write_cleans_up_too(tmp_path) -> None:
    path = tmp_path / "card.md"
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(path) as fh:
            fh.write(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []  # no target was created, no temp file was left


def test_temp_file_lives_beside_the_target(tmp_path) -> None:
    # Same folder, so the final os.replace never crosses a filesystem (and stays atomic).
    path = tmp_path / "config.yaml"
    with atomic_open(path) as fh:
        (tmp_file,) = [p for p in tmp_path.iterdir()]
        assert tmp_file.name.startswith(".config.yaml.") and tmp_file.name.endswith(".tmp")
        assert not path.exists()  # nothing visible until the block ends
        fh.write(b"x: 1\n")
    assert path.read_text() == "x: 1\n"


def test_clear_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"folder .*missing does not exist"):
        atomic_write_text(tmp_path / "missing" / "a.txt", "x")
    with pytest.raises(TypeError, match=r"atomic_write_text needs a str .*got bytes"):
        atomic_write_text(tmp_path / "a.txt", b"x")
    with pytest.raises(TypeError, match=r"atomic_write_bytes needs bytes .*got str"):
        atomic_write_bytes(tmp_path / "a.bin", "x")
    assert list(tmp_path.iterdir()) == []
