"""Where the OpenSSL uprobes go (agent/collectors/tls.py): the internal function found in the
system's libssl.so.3 is the one binutils' objdump shows SSL_read_ex/SSL_write_ex calling, and code
of another shape falls back to the exported functions. The counts through these probes are proven
against nginx and curl in tests/test_http.py."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from agent.collectors.tls import direct_callee, libssl_files, probe_points
from agent.elf import Elf, ElfError

CALL = b"\xe8" + struct.pack("<i", 0x100)


@pytest.mark.parametrize(
    ("code", "callee"),
    [
        (b"\x48\x83\xec\x08" + CALL, 0x1000 + 9 + 0x100),  # sub $8,%rsp; call (OpenSSL 3.0, Debian)
        (b"\xf3\x0f\x1e\xfa\x55\x48\x89\xe5" + CALL, 0x1000 + 13 + 0x100),  # endbr64; frame pointer; call
        (b"\x49\x89\xc8" + CALL, None),  # mov %rcx,%r8 first: the arguments change
        (b"\x48\x83\xec\x08\x31\xc9" + CALL, None),  # xor %ecx,%ecx before the call
        (b"\x48\x83\xec", None),  # cut short
    ],
)
def test_direct_callee_only_through_a_prologue(code: bytes, callee: int | None) -> None:
    assert direct_callee(code, 0x1000) == callee


def objdump_callee(library: str, function: str) -> int:
    """The target of the call in ``function``, as binutils disassembles it."""
    out = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True, check=True
    ).stdout
    body = re.search(rf"<{function}@@[^>]*>:\n(.*?)\n\n", out, re.S).group(1)  # type: ignore[union-attr]
    return int(re.search(r"\bcall\s+([0-9a-f]+)", body).group(1), 16)  # type: ignore[union-attr]


def test_system_libssl_is_probed_at_the_functions_objdump_shows_called() -> None:
    if not shutil.which("objdump"):
        pytest.skip("objdump (binutils) is not installed")
    path = next(iter(libssl_files().values()))
    elf = Elf(path)
    points = probe_points(path)
    assert [(program, func) for program, func, _ in points] == [("up_ssl_read_ex", None), ("up_ssl_write_ex", None)]
    for (_, _, offset), function in zip(points, ("SSL_read_ex", "SSL_write_ex")):
        assert offset == elf.file_offset(objdump_callee(path, function))


def test_not_an_elf_file_is_a_clear_error_and_the_exported_functions_are_probed(tmp_path: Path) -> None:
    junk = tmp_path / "libssl.so.3"
    junk.write_bytes(b"\x7fELF\x02\x01" + b"\xff" * 40)
    with pytest.raises(ElfError, match=r"libssl\.so\.3: malformed ELF file"):
        Elf(str(junk))
    assert [func for _, func, _ in probe_points(str(junk))] == ["SSL_read", "SSL_read_ex", "SSL_write", "SSL_write_ex"]
