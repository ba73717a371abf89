"""A thin ctypes layer over the distro's ``libbpf.so.1``: open, load, attach, pin, read maps.

Only what the collectors need: object open with ``pin_root_path`` and ``btf_custom_path``,
program autoload selection, auto-attach by section name, uprobes on a library's function by name,
map lookup/update/delete, batched map reads (falling back to key iteration where the kernel lacks
batch ops).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import logging
import os
import threading
from collections.abc import Iterator
from typing import Optional

from agent.host import BTF_VMLINUX

log = logging.getLogger(__name__)

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
_PERCPU_TYPES = {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH}
BPF_ANY = 0


class LibbpfError(OSError):
    """A libbpf call failed; the message carries errno text and libbpf's last warnings."""


class _OpenOpts(ctypes.Structure):
    # struct bpf_object_open_opts of libbpf 1.x (sz-versioned, so older fields stay put).
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("object_name", ctypes.c_char_p),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", ctypes.c_char_p),
        ("_attach_prog_fd", ctypes.c_uint32),
        ("kconfig", ctypes.c_char_p),
        ("btf_custom_path", ctypes.c_char_p),
        ("kernel_log_buf", ctypes.c_char_p),
        ("kernel_log_size", ctypes.c_size_t),
        ("kernel_log_level", ctypes.c_uint32),
    ]


class _BatchOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _UprobeOpts(ctypes.Structure):
    # struct bpf_uprobe_opts of libbpf 1.x: func_name is resolved in the binary's symbols by libbpf.
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("ref_ctr_offset", ctypes.c_size_t),
        ("bpf_cookie", ctypes.c_uint64),
        ("retprobe", ctypes.c_bool),
        ("func_name", ctypes.c_char_p),
    ]


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


class _Lib:
    """The loaded shared library with prototypes, and libbpf's messages captured into logging."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            self.lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        except OSError:
            self.lib = ctypes.CDLL(name, use_errno=True)
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.recent: collections.deque[str] = collections.deque(maxlen=8)
        self._lock = threading.Lock()
        vp, cp, i, u32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32
        self._proto("bpf_object__open_file", vp, cp, ctypes.POINTER(_OpenOpts))
        self._proto("bpf_object__load", i, vp)
        self._proto("bpf_object__close", None, vp)
        self._proto("bpf_object__next_program", vp, vp, vp)
        self._proto("bpf_object__find_map_by_name", vp, vp, cp)
        self._proto("bpf_program__name", cp, vp)
        self._proto("bpf_program__section_name", cp, vp)
        self._proto("bpf_program__set_autoload", i, vp, ctypes.c_bool)
        self._proto("bpf_program__attach", vp, vp)
        self._proto("bpf_program__attach_uprobe_opts", vp, vp, i, cp, ctypes.c_size_t, ctypes.POINTER(_UprobeOpts))
        self._proto("bpf_link__destroy", i, vp)
        self._proto("bpf_map__fd", i, vp)
        self._proto("bpf_map__name", cp, vp)
        self._proto("bpf_map__type", i, vp)
        self._proto("bpf_map__key_size", u32, vp)
        self._proto("bpf_map__value_size", u32, vp)
        self._proto("bpf_map__max_entries", u32, vp)
        self._proto("bpf_map__set_pin_path", i, vp, cp)
        self._proto("bpf_map__set_max_entries", i, vp, u32)
        self._proto("bpf_map_lookup_elem", i, i, vp, vp)
        self._proto("bpf_map_update_elem", i, i, vp, vp, ctypes.c_uint64)
        self._proto("bpf_map_delete_elem", i, i, vp)
        self._proto("bpf_map_get_next_key", i, i, vp, vp)
        self._proto("bpf_map_lookup_batch", i, i, vp, vp, vp, vp, ctypes.POINTER(u32), ctypes.POINTER(_BatchOpts))
        self._proto("libbpf_num_possible_cpus", i)
        self._proto("libbpf_set_print", vp, _PRINT_FN)
        self.libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
        self._printer = _PRINT_FN(self._print)
        self.lib.libbpf_set_print(self._printer)
        self.ncpus = self.lib.libbpf_num_possible_cpus()

    def _proto(self, name: str, restype: object, *argtypes: object) -> None:
        fn = getattr(self.lib, name)
        fn.restype = restype
        fn.argtypes = list(argtypes)

    def _print(self, level: int, fmt: bytes, args: int) -> int:
        buf = ctypes.create_string_buffer(65536)  # whole messages: a verifier's reason can be long
        self.libc.vsnprintf(buf, len(buf), fmt, args)
        text = buf.value.decode(errors="replace").rstrip()
        if level <= 1:  # LIBBPF_WARN, LIBBPF_INFO
            with self._lock:
                self.recent.append(text)
        log.debug("libbpf: %s", text)
        return 0

    def take_recent(self) -> str:
        with self._lock:
            text = "; ".join(self.recent)
            self.recent.clear()
        return text

    def error(self, what: str, err: Optional[int] = None) -> LibbpfError:
        code = err if err is not None else ctypes.get_errno()
        code = abs(code) or errno.EINVAL
        detail = self.take_recent()
        msg = f"{what}: {os.strerror(code)}" + (f" ({detail})" if detail else "")
        return LibbpfError(code, msg)


_lib: Optional[_Lib] = None
_lib_lock = threading.Lock()


def lib() -> _Lib:
    """The process-wide libbpf handle (loaded on first use)."""
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _Lib()
        return _lib


def num_possible_cpus() -> int:
    return lib().ncpus


# Errors of a kernel without batch reads for a map type; such maps are read key by key. 524 is the
# kernel's own ENOTSUPP, which 5.10 returns for per-CPU arrays.
_NO_BATCH = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, 524)


class BpfMap:
    """A map of a loaded object (or any map fd): raw bytes in, raw bytes out."""

    def __init__(self, handle: int) -> None:
        L = lib().lib
        self.fd: int = L.bpf_map__fd(handle)
        self.name: str = L.bpf_map__name(handle).decode()
        self.type: int = L.bpf_map__type(handle)
        self.key_size: int = L.bpf_map__key_size(handle)
        self.value_size: int = L.bpf_map__value_size(handle)
        self.max_entries: int = L.bpf_map__max_entries(handle)
        self.percpu = self.type in _PERCPU_TYPES
        # Per-CPU values come back as one 8-byte-aligned slot per possible CPU.
        self.slot_size = (self.value_size + 7) & ~7
        self.read_size = self.slot_size * lib().ncpus if self.percpu else self.value_size
        self._batch_ok = True

    def lookup(self, key: bytes) -> Optional[bytes]:
        out = ctypes.create_string_buffer(self.read_size)
        if lib().lib.bpf_map_lookup_elem(self.fd, key, out) != 0:
            if ctypes.get_errno() == errno.ENOENT:
                return None
            raise lib().error(f"lookup in map {self.name}")
        return out.raw

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        if lib().lib.bpf_map_update_elem(self.fd, key, value, flags) != 0:
            raise lib().error(f"update of map {self.name}")

    def delete(self, key: bytes) -> None:
        if lib().lib.bpf_map_delete_elem(self.fd, key) != 0 and ctypes.get_errno() != errno.ENOENT:
            raise lib().error(f"delete in map {self.name}")

    def all_keys(self) -> list[bytes]:
        L = lib().lib
        keys: list[bytes] = []
        prev: Optional[ctypes.Array[ctypes.c_char]] = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while L.bpf_map_get_next_key(self.fd, prev, nxt) == 0:
            keys.append(nxt.raw)
            prev = ctypes.create_string_buffer(nxt.raw, self.key_size)
        return keys

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value); per-CPU values hold ``slot_size`` bytes per possible CPU."""
        if self._batch_ok:
            try:
                yield from self._items_batched()
                return
            except LibbpfError as exc:
                if exc.errno not in _NO_BATCH:
                    raise
                self._batch_ok = False
        for key in self.all_keys():
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def values(self) -> bytes:
        """Every value, concatenated in key order (``read_size`` bytes each): an array in one read."""
        if self._batch_ok:
            try:
                return b"".join(vraw[: n * self.read_size] for _, vraw, n in self._batches())
            except LibbpfError as exc:
                if exc.errno not in _NO_BATCH:
                    raise
                self._batch_ok = False
        return b"".join(v for _, v in self.items())

    def _items_batched(self) -> Iterator[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        for kraw, vraw, n in self._batches():
            for i in range(n):
                out.append(
                    (
                        kraw[i * self.key_size : (i + 1) * self.key_size],
                        vraw[i * self.read_size : (i + 1) * self.read_size],
                    )
                )
        yield from out

    def _batches(self) -> list[tuple[bytes, bytes, int]]:
        """(keys, values, count) of each lookup_batch call over the whole map."""
        L = lib().lib
        chunk = max(1, min(self.max_entries, 4096))
        keys = ctypes.create_string_buffer(self.key_size * chunk)
        values = ctypes.create_string_buffer(self.read_size * chunk)
        token_in = ctypes.create_string_buffer(max(8, self.key_size))
        token_out = ctypes.create_string_buffer(max(8, self.key_size))
        opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
        first = True
        out: list[tuple[bytes, bytes, int]] = []
        while True:
            count = ctypes.c_uint32(chunk)
            rc = L.bpf_map_lookup_batch(
                self.fd, None if first else token_in, token_out, keys, values, ctypes.byref(count), opts
            )
            err = ctypes.get_errno() if rc != 0 else 0
            if rc != 0 and err != errno.ENOENT:
                raise lib().error(f"batch read of map {self.name}")
            out.append((keys.raw, values.raw, count.value))
            if rc != 0:  # ENOENT: that was the last batch
                break
            ctypes.memmove(token_in, token_out, len(token_in))
            first = False
        return out


class Link:
    """An attached program; ``destroy`` detaches it."""

    def __init__(self, handle: int, program: str, section: str) -> None:
        self._handle: Optional[int] = handle
        self.program = program
        self.section = section

    def destroy(self) -> None:
        if self._handle:
            lib().lib.bpf_link__destroy(self._handle)
            self._handle = None


class BpfObject:
    """An opened ``.bpf.o``: choose programs, load, attach, reach maps; ``close`` frees it."""

    def __init__(self, path: str, pin_root: Optional[str] = None, btf_custom_path: Optional[str] = None) -> None:
        L = lib()
        self.path = path
        # The running kernel's BTF is named explicitly when no btf_path is configured: libbpf then
        # resolves CO-RE relocations against it alone. Otherwise a type the kernel lacks (a probed one,
        # such as 6.16's trace_event_raw_tcp_retransmit_skb on 6.12) sends libbpf through the module
        # BTFs, which needs CAP_SYS_ADMIN; the service runs without it, and the load failed with EPERM.
        if btf_custom_path is None and os.path.exists(BTF_VMLINUX):
            btf_custom_path = BTF_VMLINUX
        self._keep = [os.fsencode(p) if p else None for p in (path, pin_root, btf_custom_path)]
        opts = _OpenOpts()
        opts.sz = ctypes.sizeof(_OpenOpts)
        opts.pin_root_path = self._keep[1]
        opts.btf_custom_path = self._keep[2]
        L.take_recent()
        handle = L.lib.bpf_object__open_file(self._keep[0], ctypes.byref(opts))
        if not handle:
            raise L.error(f"opening {path}")
        self._handle: Optional[int] = handle
        self._programs: dict[str, int] = {}
        prog = L.lib.bpf_object__next_program(handle, None)
        while prog:
            self._programs[L.lib.bpf_program__name(prog).decode()] = prog
            prog = L.lib.bpf_object__next_program(handle, prog)

    @property
    def program_names(self) -> list[str]:
        return list(self._programs)

    def set_autoload(self, program: str, autoload: bool) -> None:
        if lib().lib.bpf_program__set_autoload(self._programs[program], autoload) != 0:
            raise lib().error(f"selecting program {program}")

    def load(self) -> None:
        L = lib()
        L.take_recent()
        rc = L.lib.bpf_object__load(self._handle)
        if rc != 0:
            raise L.error(f"loading {os.path.basename(self.path)}", rc)

    def attach(self, program: str) -> Link:
        L = lib()
        prog = self._programs[program]
        section = L.lib.bpf_program__section_name(prog).decode()
        L.take_recent()
        handle = L.lib.bpf_program__attach(prog)
        if not handle:
            raise L.error(f"attaching {program} ({section})")
        return Link(handle, program, section)

    def attach_uprobe(
        self, program: str, binary: str, func: Optional[str], retprobe: bool = False, pid: int = -1, offset: int = 0
    ) -> Link:
        """Attach ``program`` at the entry (or, with ``retprobe``, the return) of ``func`` in the ELF
        file ``binary`` (or, with no ``func``, of the function at file offset ``offset``), for process
        ``pid`` or every process (-1)."""
        L = lib()
        opts = _UprobeOpts(ctypes.sizeof(_UprobeOpts), 0, 0, retprobe, func.encode() if func else None)
        where = func or f"{os.path.basename(binary)}+{offset:#x}"
        L.take_recent()
        handle = L.lib.bpf_program__attach_uprobe_opts(
            self._programs[program], pid, os.fsencode(binary), 0 if func else offset, ctypes.byref(opts)
        )
        if not handle:
            raise L.error(f"attaching {program} to {where} in {binary}")
        return Link(handle, program, f"uretprobe/{where}" if retprobe else f"uprobe/{where}")

    def map(self, name: str) -> BpfMap:
        handle = lib().lib.bpf_object__find_map_by_name(self._handle, name.encode())
        if not handle:
            raise LibbpfError(errno.ENOENT, f"{os.path.basename(self.path)} has no map {name}")
        return BpfMap(handle)

    def set_pin_path(self, name: str, path: str) -> None:
        """Before load: reuse the map pinned at ``path`` if there is one, else pin it there."""
        handle = lib().lib.bpf_object__find_map_by_name(self._handle, name.encode())
        if not handle:
            raise LibbpfError(errno.ENOENT, f"{os.path.basename(self.path)} has no map {name}")
        if lib().lib.bpf_map__set_pin_path(handle, os.fsencode(path)) != 0:
            raise lib().error(f"setting pin path of {name}")

    def set_max_entries(self, name: str, entries: int) -> None:
        """Before load: size map ``name`` to ``entries`` (a map a configuration leaves unused gets 1)."""
        handle = lib().lib.bpf_object__find_map_by_name(self._handle, name.encode())
        if not handle:
            raise LibbpfError(errno.ENOENT, f"{os.path.basename(self.path)} has no map {name}")
        if lib().lib.bpf_map__set_max_entries(handle, entries) != 0:
            raise lib().error(f"sizing map {name}")

    def close(self) -> None:
        if self._handle:
            lib().lib.bpf_object__close(self._handle)
            self._handle = None
