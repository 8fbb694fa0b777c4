"""Read what the dynamic loader needs from an ELF file, without running anything.

Only headers are parsed: the program headers locate ``PT_INTERP`` and ``PT_DYNAMIC``;
the dynamic section gives ``DT_NEEDED``, ``DT_RPATH`` and ``DT_RUNPATH`` as offsets
into ``DT_STRTAB``, whose virtual address is mapped back to a file offset through
the ``PT_LOAD`` segments.  Files are untrusted input (a user's site-packages), so
every offset is bounds-checked and a malformed file raises ``ElfError``.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field

ELF_MAGIC = b"\x7fELF"
_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_RPATH, _DT_RUNPATH = 0, 1, 5, 15, 29
_MAX_HEADERS = 4096
_MAX_STRING = 4096


class ElfError(ValueError):
    """The file is not an ELF object we can read."""


@dataclass(frozen=True)
class ElfInfo:
    elf_class: int  # 1 = 32-bit, 2 = 64-bit
    machine: int
    interpreter: str | None = None
    needed: tuple[str, ...] = ()
    rpath: tuple[str, ...] = ()
    runpath: tuple[str, ...] = ()
    segments: tuple[tuple[int, int, int], ...] = field(default=(), repr=False)


def is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


def read_elf(path: str) -> ElfInfo:
    """Parse the file through a read-only mapping: large libraries are never read whole."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 52:
            raise ElfError("not an ELF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return parse_elf(data)


def parse_elf(data: bytes | mmap.mmap) -> ElfInfo:
    if len(data) < 52 or data[:4] != ELF_MAGIC:
        raise ElfError("not an ELF file")
    elf_class, endian = data[4], data[5]
    if elf_class not in (1, 2) or endian not in (1, 2):
        raise ElfError(f"unsupported ELF class {elf_class} / data encoding {endian}")
    bo = "<" if endian == 1 else ">"
    if elf_class == 2:
        if len(data) < 64:
            raise ElfError("truncated ELF header")
        machine, = struct.unpack_from(bo + "H", data, 18)
        phoff, = struct.unpack_from(bo + "Q", data, 32)
        phentsize, phnum = struct.unpack_from(bo + "HH", data, 54)
        ph_fmt, dyn_fmt = bo + "IIQQQQQQ", bo + "qQ"
    else:
        machine, = struct.unpack_from(bo + "H", data, 18)
        phoff, = struct.unpack_from(bo + "I", data, 28)
        phentsize, phnum = struct.unpack_from(bo + "HH", data, 42)
        ph_fmt, dyn_fmt = bo + "IIIIIIII", bo + "iI"
    if phnum > _MAX_HEADERS or phentsize < struct.calcsize(ph_fmt):
        raise ElfError("implausible program header table")

    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    dynamic: tuple[int, int] | None = None
    interp: str | None = None
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + phentsize > len(data):
            raise ElfError("program header outside the file")
        fields = struct.unpack_from(ph_fmt, data, off)
        if elf_class == 2:
            p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = fields[:6]
        else:
            p_type, p_offset, p_vaddr, _paddr, p_filesz = fields[:5]
        if p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
        elif p_type == _PT_INTERP:
            interp = _cstring(data, p_offset, min(p_filesz, _MAX_STRING))

    if dynamic is None:
        return ElfInfo(elf_class, machine, interp, segments=tuple(loads))

    entries: list[tuple[int, int]] = []
    strtab_vaddr: int | None = None
    entsize = struct.calcsize(dyn_fmt)
    dyn_off, dyn_size = dynamic
    for off in range(dyn_off, min(dyn_off + dyn_size, len(data) - entsize + 1), entsize):
        tag, val = struct.unpack_from(dyn_fmt, data, off)
        if tag == _DT_NULL:
            break
        if tag == _DT_STRTAB:
            strtab_vaddr = val
        elif tag in (_DT_NEEDED, _DT_RPATH, _DT_RUNPATH):
            entries.append((tag, val))
    if strtab_vaddr is None:
        if entries:
            raise ElfError("dynamic section without DT_STRTAB")
        return ElfInfo(elf_class, machine, interp, segments=tuple(loads))
    strtab = _vaddr_to_offset(loads, strtab_vaddr)

    needed: list[str] = []
    rpath: list[str] = []
    runpath: list[str] = []
    for tag, val in entries:
        text = _cstring(data, strtab + val, _MAX_STRING)
        if tag == _DT_NEEDED:
            needed.append(text)
        elif tag == _DT_RPATH:
            rpath.extend(p for p in text.split(":") if p)
        else:
            runpath.extend(p for p in text.split(":") if p)
    return ElfInfo(elf_class, machine, interp, tuple(needed), tuple(rpath), tuple(runpath), tuple(loads))


def _vaddr_to_offset(loads: list[tuple[int, int, int]], vaddr: int) -> int:
    for seg_vaddr, seg_offset, seg_filesz in loads:
        if seg_vaddr <= vaddr < seg_vaddr + seg_filesz:
            return vaddr - seg_vaddr + seg_offset
    raise ElfError(f"address {vaddr:#x} is not in any PT_LOAD segment")


def _cstring(data: bytes | mmap.mmap, offset: int, limit: int) -> str:
    if offset < 0 or offset >= len(data):
        raise ElfError(f"string offset {offset:#x} outside the file")
    end = data.find(b"\0", offset, offset + limit)
    if end < 0:
        raise ElfError(f"unterminated string at {offset:#x}")
    return bytes(data[offset:end]).decode("utf-8", "surrogateescape")
