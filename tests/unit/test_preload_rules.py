"""Which directories the fork server may import from, and which files two distributions
may share (no daemon: the rules alone)."""

from __future__ import annotations

import os
from pathlib import Path

from sandboxd.environments import records
from sandboxd.jail.child import preload


def test_only_directories_root_alone_can_change_are_trusted(tmp_path: Path) -> None:
    std = os.path.dirname(os.__file__)  # /usr/lib/python3.11: root's, 0755 down to /
    mine = tmp_path / "mine"
    mine.mkdir()
    assert preload.trusted_dirs([std]) == (std,)
    # a test's tmp_path lies under /tmp (1777): not root's alone, whoever owns the leaf
    assert preload.trusted_dirs([str(mine)]) == ()
    assert preload.trusted_dirs(["relative/path", "/no/such/dir"]) == ()


def test_a_module_shadowed_on_the_runs_path_is_not_shared(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    (shadow / "json").mkdir(parents=True)
    (shadow / "json" / "__init__.py").write_text("")
    std = os.path.dirname(os.__file__)
    shared, in_workers, missing = preload.split(["json", "nosuchmodule_xyz", "sys"], [str(shadow), std], [std])
    assert shared == ["sys"] and in_workers == ["json"], (shared, in_workers)
    assert list(missing) == ["nosuchmodule_xyz"]
    shared, in_workers, _ = preload.split(["json"], [std, str(shadow)], [std])
    assert shared == ["json"] and in_workers == []


def _dist(site: Path, name: str, files: dict[str, str]) -> None:
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    lines = [f"{path},sha256={digest},1" if digest else f"{path},," for path, digest in files.items()]
    (info / "RECORD").write_text("\n".join([*lines, f"{name}-1.0.dist-info/RECORD,,"]) + "\n")


def test_two_distributions_writing_one_file_differently_clash(tmp_path: Path) -> None:
    _dist(tmp_path, "rtgood", {"rtgood/__init__.py": "AAA", "ns/__init__.py": "SAME"})
    _dist(tmp_path, "rtevil", {"rtevil/__init__.py": "BBB", "./rtgood/__init__.py": "CCC", "ns/__init__.py": "SAME"})
    found = records.clashes(str(tmp_path))
    assert found == [("rtgood/__init__.py", ["rtevil", "rtgood"])]  # the namespace package's twin is fine
    assert "rtgood/__init__.py (rtevil and rtgood)" in records.describe(found)


def test_a_shared_file_without_a_hash_clashes(tmp_path: Path) -> None:
    _dist(tmp_path, "a", {"x.py": ""})
    _dist(tmp_path, "b", {"x.py": ""})
    assert records.clashes(str(tmp_path)) == [("x.py", ["a", "b"])]
