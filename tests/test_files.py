"""util.files.staged_folder: the one "write into a staging folder, then swap it in" step the savers share."""
import pytest

from tuneonce.util.files import staged_folder


def test_staged_folder_replaces_the_old_folder_whole(tmp_path):
    folder = tmp_path / "out" / "base"
    with staged_folder(folder) as staging:
        assert staging.parent == folder.parent and staging.is_dir() and not folder.exists()
        (staging / "a.txt").write_text("one")
    assert (folder / "a.txt").read_text() == "one"
    with staged_folder(folder) as staging:
        (staging / "b.txt").write_text("two")
        assert (folder / "a.txt").read_text() == "one"  # readers see the old folder until the swap
    assert sorted(p.name for p in folder.iterdir()) == ["b.txt"]  # nothing of the old one is left
    assert sorted(p.name for p in folder.parent.iterdir()) == ["base"]  # no staging folder left beside it


def test_staged_folder_keeps_the_old_folder_when_writing_fails(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "a.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with staged_folder(folder) as staging:
            (staging / "half.txt").write_text("half")
            raise OSError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    assert [p.name for p in folder.iterdir()] == ["a.txt"] and (folder / "a.txt").read_text() == "old"
