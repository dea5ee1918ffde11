"""A thin ctypes binding over the system's libbpf (libbpf1, 1.1 on Debian 12).

Only what nstrace needs: open and load one CO-RE object, attach its tracing
programs, create BPF netfilter links, update maps, and poll a ring buffer.
libbpf relocates the object against the kernel's BTF at load time, so nothing
is compiled at run time (DESIGN.md explains why bcc is not used).

libbpf 1.1 predates BPF_PROG_TYPE_NETFILTER (kernel 6.4, libbpf 1.2): it does
not know the `netfilter` section, so the type and expected attach type of
those programs are set by hand before load, and their links are made with the
bpf(2) BPF_LINK_CREATE command directly (see KNOWN_ISSUES.md).

Every libbpf failure is translated into :class:`BpfError` with the errno.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import threading
from collections.abc import Callable, Iterator

from tracer.errors import CannotTraceError

log = logging.getLogger(__name__)

BPF_PROG_TYPE_NETFILTER = 32  # include/uapi/linux/bpf.h, kernel 6.4
BPF_NETFILTER = 45  # enum bpf_attach_type
BPF_LINK_CREATE = 28  # enum bpf_cmd
NFPROTO_IPV4 = 2
SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)


class BpfError(CannotTraceError):
    """libbpf or the bpf(2) system call refused something."""

    def __init__(self, what: str, err: int) -> None:
        self.errno = abs(err)
        name = errno.errorcode.get(self.errno, str(self.errno))
        super().__init__(f"{what}: {name} ({os.strerror(self.errno)})")


def _load_libbpf() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise CannotTraceError(
            f"libbpf is not installed ({exc}); install it with "
            "`apt-get install libbpf1` (or run `make deps`)"
        ) from None


_lib: ctypes.CDLL | None = None
_libc = ctypes.CDLL(None, use_errno=True)

_PRINT_FN = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p
)
SAMPLE_FN = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t
)


def _vsnprintf(fmt: bytes, args: int) -> str:
    buf = ctypes.create_string_buffer(1024)
    _libc.vsnprintf(buf, len(buf), fmt, ctypes.c_void_p(args))
    return buf.value.decode(errors="replace").rstrip()


_quiet = threading.local()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Demote libbpf's warnings to debug while trying something that may fail."""
    _quiet.on = True
    try:
        yield
    finally:
        _quiet.on = False


@_PRINT_FN
def _libbpf_print(level: int, fmt: bytes, args: int) -> int:
    # libbpf's levels: 0 warn, 1 info, 2 debug; its lines start with "libbpf: ".
    warn = level == 0 and not getattr(_quiet, "on", False)
    if warn or log.isEnabledFor(logging.DEBUG):
        log.log(logging.WARNING if warn else logging.DEBUG, "%s", _vsnprintf(fmt, args))
    return 0


def _follow_log_level() -> None:
    """Give libbpf a print function only when nstrace logs at debug level (-vv).

    libbpf calls its print function some 600 times while it opens, loads and
    attaches nstrace's object (CO-RE relocation lines, at debug level), and
    each call into a Python callback must take the GIL: while scapy imports
    on its thread in `nstrace ping`, that doubled the time to attach (45 ->
    100 ms, `make bench`). Without -vv no function is set and libbpf prints
    nothing; its failures still come back as error codes, which nstrace
    reports in its own words, and -vv shows libbpf's account (the verifier's
    log among it).
    """
    debug = log.isEnabledFor(logging.DEBUG)
    lib().libbpf_set_print(_libbpf_print if debug else _PRINT_FN())


def lib() -> ctypes.CDLL:
    """The loaded libbpf, with argument types declared once."""
    global _lib
    if _lib is not None:
        return _lib
    bpf = _load_libbpf()
    p, i, u32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32
    sigs = {
        "bpf_object__open_file": (p, [ctypes.c_char_p, p]),
        "bpf_object__load": (i, [p]),
        "bpf_object__close": (None, [p]),
        "bpf_object__next_program": (p, [p, p]),
        "bpf_object__find_map_by_name": (p, [p, ctypes.c_char_p]),
        "bpf_program__name": (ctypes.c_char_p, [p]),
        "bpf_program__section_name": (ctypes.c_char_p, [p]),
        "bpf_program__set_type": (i, [p, u32]),
        "bpf_program__set_expected_attach_type": (i, [p, u32]),
        "bpf_program__set_autoload": (i, [p, ctypes.c_bool]),
        "bpf_program__fd": (i, [p]),
        "bpf_program__attach": (p, [p]),
        "bpf_link__destroy": (i, [p]),
        "bpf_map__fd": (i, [p]),
        "bpf_map_update_elem": (i, [i, p, p, ctypes.c_uint64]),
        "bpf_map_lookup_elem": (i, [i, p, p]),
        "ring_buffer__new": (p, [i, SAMPLE_FN, p, p]),
        "ring_buffer__poll": (i, [p, i]),
        "ring_buffer__consume": (i, [p]),
        "ring_buffer__epoll_fd": (i, [p]),
        "ring_buffer__free": (None, [p]),
        "libbpf_num_possible_cpus": (i, []),
        "libbpf_set_print": (p, [_PRINT_FN]),
        "libbpf_strerror": (i, [i, ctypes.c_char_p, ctypes.c_size_t]),
    }
    for name, (restype, argtypes) in sigs.items():
        func = getattr(bpf, name)
        func.restype = restype
        func.argtypes = argtypes
    bpf.libbpf_set_print(_libbpf_print)
    _lib = bpf
    return bpf


def _strerror(err: int) -> str:
    """libbpf's text for *err*: errno, or its own codes from 4000 (libbpf.h)."""
    buf = ctypes.create_string_buffer(128)
    if lib().libbpf_strerror(err, buf, len(buf)) == 0:
        return buf.value.decode(errors="replace")
    return os.strerror(err)


def _check_ptr(ptr: int | None, what: str) -> int:
    if not ptr:
        raise BpfError(what, ctypes.get_errno() or errno.EINVAL)
    return ptr


def _check_rc(rc: int, what: str) -> int:
    if rc < 0:
        raise BpfError(what, -rc if rc != -1 else ctypes.get_errno())
    return rc


class _LinkCreateNetfilter(ctypes.Structure):
    # union bpf_attr, the BPF_LINK_CREATE member with its netfilter part
    # (include/uapi/linux/bpf.h, kernel 6.4).
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pf", ctypes.c_uint32),
        ("hooknum", ctypes.c_uint32),
        ("priority", ctypes.c_int32),
        ("nf_flags", ctypes.c_uint32),
        ("_pad", ctypes.c_uint8 * 32),
    ]


def netfilter_link(prog_fd: int, hooknum: int, priority: int) -> int:
    """Link a netfilter program at an IPv4 hook of the caller's namespace.

    Returns the link's file descriptor; closing it detaches the program. The
    link is made in the network namespace of the calling thread.
    """
    attr = _LinkCreateNetfilter(
        prog_fd=prog_fd,
        attach_type=BPF_NETFILTER,
        pf=NFPROTO_IPV4,
        hooknum=hooknum,
        priority=priority,
    )
    _libc.syscall.restype = ctypes.c_long
    fd = _libc.syscall(
        ctypes.c_long(SYS_BPF),
        ctypes.c_int(BPF_LINK_CREATE),
        ctypes.byref(attr),
        ctypes.c_uint(ctypes.sizeof(attr)),
    )
    if fd < 0:
        raise BpfError(f"netfilter link at hook {hooknum}", ctypes.get_errno())
    return fd


class Program:
    def __init__(self, obj: BpfObject, ptr: int) -> None:
        self.obj = obj
        self.ptr = ptr
        self.name = lib().bpf_program__name(ptr).decode()
        self.section = lib().bpf_program__section_name(ptr).decode()

    @property
    def fd(self) -> int:
        return lib().bpf_program__fd(self.ptr)

    def attach(self) -> int:
        """Attach by section name (tp_btf/...); returns the libbpf link."""
        link = lib().bpf_program__attach(self.ptr)
        return _check_ptr(link, f"attach {self.section}")


class BpfObject:
    """One BPF object file: its programs, maps and links, closed together."""

    def __init__(self, path: str) -> None:
        if not os.path.exists(path):
            raise CannotTraceError(
                f"BPF object {path} is missing; build it with `make probes`"
            )
        self.path = path
        _follow_log_level()
        with quiet():  # libbpf's own lines would come before nstrace's one
            ptr = lib().bpf_object__open_file(path.encode(), None)
        if not ptr:
            err = ctypes.get_errno() or errno.EINVAL
            raise CannotTraceError(
                f"BPF object {path} cannot be opened ({_strerror(err)}); "
                "rebuild it with `make probes`"
            )
        self.ptr = ptr
        self.links: list[int] = []
        self.link_fds: list[int] = []
        self.programs: dict[str, Program] = {}
        prog = lib().bpf_object__next_program(self.ptr, None)
        while prog:
            program = Program(self, prog)
            self.programs[program.name] = program
            prog = lib().bpf_object__next_program(self.ptr, prog)

    def prepare_netfilter(self, name: str) -> None:
        """Declare *name* a netfilter program (libbpf 1.1 cannot tell)."""
        prog = self.programs[name].ptr
        _check_rc(lib().bpf_program__set_type(prog, BPF_PROG_TYPE_NETFILTER), name)
        _check_rc(
            lib().bpf_program__set_expected_attach_type(prog, BPF_NETFILTER), name
        )

    def set_autoload(self, name: str, load: bool) -> None:
        _check_rc(lib().bpf_program__set_autoload(self.programs[name].ptr, load), name)

    def load(self) -> None:
        _check_rc(lib().bpf_object__load(self.ptr), f"load {self.path}")

    def map_fd(self, name: str) -> int:
        ptr = _check_ptr(
            lib().bpf_object__find_map_by_name(self.ptr, name.encode()), f"map {name}"
        )
        return lib().bpf_map__fd(ptr)

    def attach(self, name: str) -> None:
        self.links.append(self.programs[name].attach())

    def add_link_fd(self, fd: int) -> None:
        self.link_fds.append(fd)

    def close(self) -> None:
        """Detach every link and free the object; safe to call twice."""
        for link in self.links:
            lib().bpf_link__destroy(link)
        self.links.clear()
        for fd in self.link_fds:
            os.close(fd)
        self.link_fds.clear()
        if self.ptr:
            lib().bpf_object__close(self.ptr)
            self.ptr = 0


def map_update(fd: int, key: ctypes._CData, value: ctypes._CData) -> None:
    rc = lib().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), 0)
    _check_rc(rc, "map update")


def map_lookup(fd: int, key: ctypes._CData, value: ctypes._CData) -> bool:
    return lib().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value)) == 0


def possible_cpus() -> int:
    return _check_rc(lib().libbpf_num_possible_cpus(), "count CPUs")


# What the sample callback returns to stop a poll early. libbpf stops
# consuming at a negative return, keeps the record as consumed, and passes the
# value on (ringbuf_process_ring, tools/lib/bpf/ringbuf.c, libbpf 1.1).
_STOP = -errno.ECANCELED


class RingBuffer:
    """libbpf's ring buffer consumer; records are handed to *on_record* as bytes.

    A poll reads until the buffer is empty, which never happens while records
    come faster than they are handled; when *on_record* returns True the poll
    ends after that record, so that the caller gets control back.
    """

    def __init__(self, map_fd: int, on_record: Callable[[bytes], bool | None]) -> None:
        def sample(_ctx: int, data: int, size: int) -> int:
            return _STOP if on_record(ctypes.string_at(data, size)) else 0

        self._callback = SAMPLE_FN(sample)  # kept alive as long as the buffer
        self.ptr = _check_ptr(
            lib().ring_buffer__new(map_fd, self._callback, None, None), "ring buffer"
        )

    def fileno(self) -> int:
        return lib().ring_buffer__epoll_fd(self.ptr)

    def poll(self, timeout_ms: int) -> int:
        rc = lib().ring_buffer__poll(self.ptr, timeout_ms)
        if rc in (-errno.EINTR, _STOP):
            return 0
        return _check_rc(rc, "ring buffer poll")

    def consume(self) -> int:
        return _check_rc(lib().ring_buffer__consume(self.ptr), "ring buffer consume")

    def close(self) -> None:
        if self.ptr:
            lib().ring_buffer__free(self.ptr)
            self.ptr = 0
