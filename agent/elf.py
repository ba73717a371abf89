"""Just enough of an ELF64 (little-endian) reader to find exported functions and read their code.

Used to place uprobes (``agent/collectors/tls.py``): symbol values from ``.dynsym``, and the file
offset of a virtual address from the PT_LOAD segments.
"""

from __future__ import annotations

import struct

SHT_DYNSYM = 11
PT_LOAD = 1


class ElfError(ValueError):
    """The file is not an ELF64 little-endian object this reader understands."""


class Elf:
    """An ELF file's dynamic symbols and loadable segments, read once."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            self.data = f.read()
        try:
            self._parse()
        except (struct.error, IndexError, ValueError) as exc:
            raise ElfError(f"{path}: malformed ELF file ({exc})") from None

    def _parse(self) -> None:
        d = self.data
        if d[:4] != b"\x7fELF" or d[4] != 2 or d[5] != 1:
            raise ElfError(f"{self.path}: not a 64-bit little-endian ELF file")
        phoff, shoff = struct.unpack_from("<QQ", d, 32)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", d, 54)
        self.segments: list[tuple[int, int, int]] = []  # (vaddr, file offset, file size) of each PT_LOAD
        for i in range(phnum):
            p_type, _flags, off, vaddr, _paddr, filesz = struct.unpack_from("<IIQQQQ", d, phoff + i * phentsize)
            if p_type == PT_LOAD:
                self.segments.append((vaddr, off, filesz))
        sections = [struct.unpack_from("<IIQQQQIIQQ", d, shoff + i * shentsize) for i in range(shnum)]
        self.symbols: dict[str, tuple[int, int]] = {}  # name -> (address, size)
        for _name, sh_type, _f, _a, off, size, link, _info, _al, entsize in sections:
            if sh_type != SHT_DYNSYM or not entsize:
                continue
            str_off = sections[link][4]
            for pos in range(off, off + size, entsize):
                st_name, _st_info, _other, shndx, value, sym_size = struct.unpack_from("<IBBHQQ", d, pos)
                if shndx and value:
                    end = d.index(b"\0", str_off + st_name)
                    self.symbols.setdefault(d[str_off + st_name : end].decode(errors="replace"), (value, sym_size))

    def file_offset(self, vaddr: int) -> int:
        """The file offset of virtual address ``vaddr``."""
        for start, off, size in self.segments:
            if start <= vaddr < start + size:
                return vaddr - start + off
        raise ElfError(f"{self.path}: address {vaddr:#x} is in no loadable segment")

    def code(self, vaddr: int, size: int) -> bytes:
        """``size`` bytes of the file at virtual address ``vaddr``."""
        off = self.file_offset(vaddr)
        return self.data[off : off + size]
