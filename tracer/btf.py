"""Read names out of the running kernel's BTF (/sys/kernel/btf/vmlinux).

The kfree_skb tracepoint hands over the drop reason as a number whose
meaning changes between kernel versions (enum skb_drop_reason grows in
almost every release), so the names are read from the kernel's own type
information instead of being copied into nstrace. The format is the kernel's
BTF (Documentation/bpf/btf.rst): a header, a type section and a string
section; only enums are decoded here, other kinds are skipped by size.
"""

from __future__ import annotations

import functools
import logging
import os
import struct

from tracer.errors import CannotTraceError

log = logging.getLogger(__name__)

BTF_PATH = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F

# Bytes that follow struct btf_type, per kind: a fixed part and a part per
# vlen item (Documentation/bpf/btf.rst, "Type Encoding").
_KIND_EXTRA = {
    1: (4, 0),
    2: (0, 0),
    3: (12, 0),
    4: (0, 12),
    5: (0, 12),
    6: (0, 8),
    7: (0, 0),
    8: (0, 0),
    9: (0, 0),
    10: (0, 0),
    11: (0, 0),
    12: (0, 0),
    13: (0, 8),
    14: (4, 0),
    15: (0, 12),
    16: (0, 0),
    17: (4, 0),
    18: (0, 0),
    19: (0, 12),
}
KIND_ENUM = 6
KIND_ENUM64 = 19


def btf_path() -> str:
    """The BTF file to read; NSTRACE_BTF overrides it (tests, odd kernels)."""
    return os.environ.get("NSTRACE_BTF", BTF_PATH)


def check_btf() -> str:
    """Raise CannotTraceError unless the kernel exposes its BTF."""
    path = btf_path()
    try:
        with open(path, "rb") as fh:
            magic = struct.unpack("<H", fh.read(2))[0]
    except OSError:
        raise CannotTraceError(
            f"kernel BTF {path} is missing; nstrace needs a kernel built with "
            "CONFIG_DEBUG_INFO_BTF=y (Debian 12, Ubuntu 20.10 and later have it)"
        ) from None
    if magic != BTF_MAGIC:
        raise CannotTraceError(f"{path} is not BTF (bad magic); check NSTRACE_BTF")
    return path


def _enums(data: bytes) -> dict[str, dict[int, str]]:
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != BTF_MAGIC:
        raise CannotTraceError("kernel BTF has a bad magic number")
    type_off, type_len, str_off, _str_len = struct.unpack_from("<IIII", data, 8)
    types = hdr_len + type_off
    strings = hdr_len + str_off

    def name(offset: int) -> str:
        start = strings + offset
        return data[start : data.index(b"\0", start)].decode()

    found: dict[str, dict[int, str]] = {}
    pos, end = types, types + type_len
    while pos < end:
        name_off, info, _size = struct.unpack_from("<III", data, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        pos += 12
        fixed, per_item = _KIND_EXTRA.get(kind, (0, 0))
        if kind in (KIND_ENUM, KIND_ENUM64) and name_off:
            values = {}
            for item in range(vlen):
                item_name, low = struct.unpack_from("<Ii", data, pos + item * per_item)
                values[low] = name(item_name)
            found[name(name_off)] = values
        pos += fixed + vlen * per_item
    return found


def _string(data: bytes, start: int) -> str:
    return data[start : data.index(b"\0", start)].decode()


def _find_enum(data: bytes, enum_name: str) -> dict[int, str] | None:
    """Kernel enum *enum_name* found by its name, without walking every type.

    Walking vmlinux's ~150,000 types in Python takes about 0.25 s, half the
    time budget of `nstrace ping` (measured with `make bench`). An enum's
    btf_type starts with the offset of its name in the string section, so
    the search is for that offset, 4-byte aligned, followed by an info word
    of kind ENUM or ENUM64; every enumerator's name is then checked to lie in
    the string section. None when that does not pin it down: the caller then
    walks the types.
    """
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != BTF_MAGIC:
        return None
    type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
    types, strings = hdr_len + type_off, hdr_len + str_off
    at = data.find(b"\0" + enum_name.encode() + b"\0", strings, strings + str_len)
    if at < 0:
        return None
    needle = struct.pack("<I", at + 1 - strings)
    pos = data.find(needle, types, types + type_len)
    while pos >= 0:
        if (pos - types) % 4 == 0:
            _name, info, _size = struct.unpack_from("<III", data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            if kind in (KIND_ENUM, KIND_ENUM64):
                per_item = _KIND_EXTRA[kind][1]
                items = [
                    struct.unpack_from("<Ii", data, pos + 12 + i * per_item)
                    for i in range(vlen)
                ]
                if all(0 < name_off < str_len for name_off, _ in items):
                    return {low: _string(data, strings + off) for off, low in items}
        pos = data.find(needle, pos + 1, types + type_len)
    return None


@functools.cache
def enum(enum_name: str) -> dict[int, str]:
    """The values of kernel enum *enum_name*, by number ({} if unknown)."""
    with open(check_btf(), "rb") as fh:
        data = fh.read()
    found = _find_enum(data, enum_name)
    if found is not None:
        return found
    return _enums(data).get(enum_name, {})


@functools.cache
def drop_reasons() -> dict[int, str]:
    """skb_drop_reason numbers to names without the SKB_DROP_REASON_ prefix."""
    prefix = "SKB_DROP_REASON_"
    return {
        value: label.removeprefix(prefix)
        for value, label in enum("skb_drop_reason").items()
    }
