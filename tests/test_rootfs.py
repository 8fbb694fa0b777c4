"""The root builder and its ELF dependency resolution."""

from __future__ import annotations

import os
import shutil
import stat
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_root
from harness import REPO
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxd.jail.root import elf, rootfs
from sandboxd.jail.root.ldpath import LibraryResolver, multiarch
from sandboxd.jail.spec.sections import forbidden_prefix


def make_elf(needed: list[str], runpath: str = "", machine: int = 62) -> bytes:
    """A minimal, valid little-endian ELF64 shared object with a dynamic section."""
    strtab = b"\0"
    offsets = []
    for name in [*needed, runpath] if runpath else needed:
        offsets.append(len(strtab))
        strtab += name.encode() + b"\0"
    ehdr_size, phdr_size = 64, 56
    phoff = ehdr_size
    dyn_off = phoff + 2 * phdr_size
    dyn = b""
    for off in offsets[: len(needed)]:
        dyn += struct.pack("<qQ", 1, off)  # DT_NEEDED
    if runpath:
        dyn += struct.pack("<qQ", 29, offsets[-1])  # DT_RUNPATH
    str_off = dyn_off + len(dyn) + 3 * 16
    dyn += struct.pack("<qQ", 5, str_off)  # DT_STRTAB (vaddr == offset: one PT_LOAD at 0)
    dyn += struct.pack("<qQ", 0, 0)  # DT_NULL
    dyn += b"\0" * 16
    total = str_off + len(strtab)
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    ehdr += struct.pack("<HHIQQQIHHHHHH", 3, machine, 1, 0, phoff, 0, 0, ehdr_size, phdr_size, 2, 64, 0, 0)
    ph_load = struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, total, total, 0x1000)
    ph_dyn = struct.pack("<IIQQQQQQ", 2, 6, dyn_off, dyn_off, dyn_off, len(dyn), len(dyn), 8)
    data = ehdr + ph_load + ph_dyn + dyn
    assert len(data) == str_off
    return data + strtab


def test_parse_real_interpreter() -> None:
    info = elf.read_elf(os.path.realpath("/usr/bin/python3"))
    assert info.interpreter and info.interpreter.startswith("/lib")
    assert "libc.so.6" in info.needed


def test_parse_synthetic_elf() -> None:
    info = elf.parse_elf(make_elf(["libfoo.so.1", "libc.so.6"], "$ORIGIN/../libs"))
    assert info.needed == ("libfoo.so.1", "libc.so.6")
    assert info.runpath == ("$ORIGIN/../libs",)


@pytest.mark.parametrize("data", [b"", b"\x7fELF", b"\x7fELF" + b"\x09" * 60, make_elf(["x"])[:100]])
def test_malformed_elf_raises_elferror(data: bytes) -> None:
    with pytest.raises(elf.ElfError):
        elf.parse_elf(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=512), st.integers(0, 400))
def test_elf_parser_never_crashes_on_garbage(noise: bytes, cut: int) -> None:
    base = make_elf(["libfoo.so"], "$ORIGIN")
    data = bytearray(base[:cut] + noise)
    if len(data) > 4:
        data[:4] = b"\x7fELF"
    try:
        elf.parse_elf(bytes(data))
    except (elf.ElfError, ValueError, struct.error):
        pass


def test_resolver_follows_origin_runpath(tmp_path: Path) -> None:
    site = tmp_path / "site" / "pkg"
    libs = tmp_path / "site" / "pkg.libs"
    site.mkdir(parents=True)
    libs.mkdir()
    (site / "_ext.so").write_bytes(make_elf(["libbundled.so.1", "libc.so.6"], "$ORIGIN/../pkg.libs"))
    (libs / "libbundled.so.1").write_bytes(make_elf(["libm.so.6"]))
    found, missing = LibraryResolver().closure([str(site / "_ext.so")])
    assert str(libs / "libbundled.so.1") in found
    assert any(p.endswith("/libc.so.6") for p in found) and any(p.endswith("/libm.so.6") for p in found)
    assert missing == {}


def test_resolver_reports_missing(tmp_path: Path) -> None:
    (tmp_path / "x.so").write_bytes(make_elf(["libdoesnotexist.so.9"]))
    _found, missing = LibraryResolver().closure([str(tmp_path / "x.so")])
    assert missing == {str(tmp_path / "x.so"): ["libdoesnotexist.so.9"]}


def test_multiarch_is_derived() -> None:
    assert multiarch().endswith("-linux-gnu")
    assert multiarch().split("-")[0] in ("x86_64", "aarch64", "i386", "arm", "powerpc64le", "s390x", "riscv64")


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    # Under the checkout, unless the checkout itself sits where no root may take files from
    # (a clone in /tmp or /home): then /var/tmp.
    repo = os.path.realpath(REPO)
    base = Path("/var/tmp/sandboxd-tests") if forbidden_prefix(repo) else Path(repo) / ".cache" / "tests"
    base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "pkg" / "sub").mkdir(parents=True)
    (src / "pkg" / "mod.py").write_text("x = 1\n")
    (src / "pkg" / "sub" / "data.txt").write_text("data")
    (src / "pkg" / "skip.pyc").write_text("excluded")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.txt").write_text("target")
    (outside / "secretdir").mkdir()
    (outside / "secretdir" / "key").write_text("secret")
    (src / "pkg" / "link_to_file").symlink_to(outside / "target.txt")
    (src / "pkg" / "link_to_dir").symlink_to(outside / "secretdir")
    (outside / "private").mkdir(mode=0o700)
    (src / "pkg" / "link_to_private").symlink_to(outside / "private")
    return src


def test_build_links_files_keeps_symlinks_and_refuses_outside_dirs(tmp_path: Path) -> None:
    require_root()
    src = _tree(tmp_path)
    spec = rootfs.RootSpec((str(src),), exclude=("*.pyc",), generated={"etc/passwd": b"root:x:0:0::/:/x\n"})
    info = rootfs.ensure_root(spec, str(tmp_path / "roots"))
    root = Path(info.path)
    assert not info.reused
    assert (root / str(src).lstrip("/") / "pkg" / "mod.py").read_text() == "x = 1\n"
    assert not (root / str(src).lstrip("/") / "pkg" / "skip.pyc").exists()
    # a link to a file brings the file; a link to a directory outside the paths stays dangling
    assert (root / str(tmp_path / "outside" / "target.txt").lstrip("/")).read_text() == "target"
    assert not (root / str(tmp_path / "outside" / "secretdir").lstrip("/")).exists()
    assert any("secretdir: directory outside" in w for w in info.warnings)
    # no warning for a directory no run could enter anyway (like /etc/ssl/private)
    assert not any("link_to_private" in w for w in info.warnings)
    assert not (root / str(tmp_path / "outside" / "private").lstrip("/")).exists()
    assert (root / "etc" / "passwd").read_bytes() == b"root:x:0:0::/:/x\n"
    for d in ("work", "tmp", "dev/shm"):
        assert (root / d).is_dir()
    # the jail's own bookkeeping stays out of what runs can list
    assert not [name for name in os.listdir(root) if name.startswith(".")]
    assert os.path.exists(info.path + rootfs.MANIFEST_SUFFIX)
    assert os.path.realpath(tmp_path / "roots" / "current") == info.path


@pytest.mark.parametrize("hard_links", [False, True])
def test_files_are_root_owned_not_writable_and_without_setid(tmp_path: Path, hard_links: bool) -> None:
    require_root()
    src = tmp_path / "src"
    src.mkdir()
    (src / "setuid").write_bytes(b"x")
    os.chmod(src / "setuid", 0o4755)
    (src / "user_owned").write_bytes(b"y")
    os.chown(src / "user_owned", 1234, 1234)
    os.chmod(src / "user_owned", 0o666)
    (src / "normal").write_bytes(b"z")
    info = rootfs.ensure_root(rootfs.RootSpec((str(src),), hard_links=hard_links), str(tmp_path / "roots"))
    for name in ("setuid", "user_owned", "normal"):
        st_ = os.lstat(info.path + str(src / name))
        assert st_.st_uid == 0 and st_.st_gid == 0, name
        assert not st_.st_mode & (stat.S_ISUID | stat.S_ISGID | 0o022), (name, oct(st_.st_mode))
        # by default no file of the root is the host's inode (no shared locks or page cache)
        assert (st_.st_ino == os.lstat(src / name).st_ino) == (hard_links and name == "normal")
        # a copy keeps the source's mtime: the .pyc files beside it record it, and stay valid
        assert st_.st_mtime_ns == os.lstat(src / name).st_mtime_ns, name
    if hard_links:
        assert info.copied == 2 and info.linked == 1  # only the safe file is hard-linked
    else:
        assert info.copied == 3 and info.linked == 0


def test_unchanged_config_reuses_changed_source_rebuilds(tmp_path: Path) -> None:
    require_root()
    src = _tree(tmp_path)
    spec = rootfs.RootSpec((str(src),))
    first = rootfs.ensure_root(spec, str(tmp_path / "roots"))
    again = rootfs.ensure_root(spec, str(tmp_path / "roots"))
    assert again.reused and again.path == first.path
    time.sleep(0.01)
    (src / "pkg" / "mod.py").write_text("x = 2\n")
    rebuilt = rootfs.ensure_root(spec, str(tmp_path / "roots"))
    assert not rebuilt.reused and rebuilt.path != first.path
    assert Path(rebuilt.path + str(src / "pkg" / "mod.py")).read_text() == "x = 2\n"
    rootfs.remove_stale_roots(str(tmp_path / "roots"), [rebuilt.path])
    assert not os.path.exists(first.path)


def test_damaged_root_is_detected_and_rebuilt(tmp_path: Path) -> None:
    require_root()
    src = _tree(tmp_path)
    spec = rootfs.RootSpec((str(src),))
    first = rootfs.ensure_root(spec, str(tmp_path / "roots"))
    os.unlink(first.path + str(src / "pkg" / "sub" / "data.txt"))
    again = rootfs.ensure_root(spec, str(tmp_path / "roots"))
    assert not again.reused
    assert Path(again.path + str(src / "pkg" / "sub" / "data.txt")).read_text() == "data"


def test_forbidden_host_paths_are_never_included(tmp_path: Path) -> None:
    require_root()
    info = rootfs.ensure_root(rootfs.RootSpec(("/proc/self", "/etc/sandboxd", "/run")), str(tmp_path / "roots"))
    assert info.files == 0
    assert sum("refusing" in w or "does not exist" in w for w in info.warnings) == 3


def test_default_root_resolves_the_interpreters_libraries(tmp_path: Path) -> None:
    require_root()
    from sandboxd.config import DEFAULT_ROOT_EXCLUDE, DEFAULT_ROOT_PATHS

    info = rootfs.ensure_root(rootfs.RootSpec(DEFAULT_ROOT_PATHS, DEFAULT_ROOT_EXCLUDE), str(tmp_path / "roots"))
    assert info.missing_libraries == {}
    root = info.path
    ma = multiarch()
    for lib in ("libc.so.6", "libssl.so.3", "libcrypto.so.3", "libsqlite3.so.0", "libz.so.1", "libffi.so.8"):
        assert os.path.exists(f"{root}/usr/lib/{ma}/{lib}"), lib
    assert os.path.islink(f"{root}/lib") or os.path.isdir(f"{root}/lib")
    assert os.path.exists(f"{root}/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}/json/__init__.py")
    assert not os.path.exists(f"{root}/etc/shadow") and not os.path.exists(f"{root}/proc")
    shutil.rmtree(tmp_path / "roots")
