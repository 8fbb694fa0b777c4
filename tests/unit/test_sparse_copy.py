"""rootfs.copy_data: a root's copy of a file holds its data where the source does and holes
where the source has them (a package's 1 GiB sparse file took 1 GiB in every copy).

Real files in a temporary directory; no root needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandboxd.jail.root.rootfs import copy_data

MiB = 1 << 20


def make(path: Path, size: int, data: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        for offset, chunk in data.items():
            f.seek(offset)
            f.write(chunk)
        f.truncate(size)


@pytest.mark.parametrize(("size", "data"), [
    (256 * MiB, {}),  # a hole and nothing else
    (64 * MiB + 7, {0: b"head" * 1000, 32 * MiB: b"middle", 64 * MiB: b"tail..."}),  # data ends the file
    (48 * MiB, {5 * MiB: os.urandom(3 * MiB)}),  # a hole at the end
    (3 * MiB, {0: os.urandom(3 * MiB)}),  # dense
    (0, {}),
])
def test_a_copy_has_the_sources_bytes_and_holes(tmp_path: Path, size: int, data: dict[int, bytes]) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make(src, size, data)
    fd, out = os.open(src, os.O_RDONLY), os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        copy_data(fd, out, size)
    finally:
        os.close(fd)
        os.close(out)
    assert dest.read_bytes() == src.read_bytes()
    assert os.stat(dest).st_size == size
    assert os.stat(dest).st_blocks <= os.stat(src).st_blocks  # no block the source does not have
