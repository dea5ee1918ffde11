"""A small ctypes binding to libnftables, used inside one network namespace.

Why not the `nft` command: an nftables table with the ``owner`` flag lives as
long as the netlink socket that created it (kernel 5.12, "netfilter:
nf_tables: add userspace owner flag"; nft(8), TABLES). Made by `nft` it would
vanish when `nft` exits; made through libnftables in nstrace's own process it
stays for the trace and vanishes when nstrace exits, even on ``kill -9``,
because the kernel closes the socket then. Debian's python3-nftables binding
is not installed everywhere (and not in a venv), so this module binds the few
calls it needs from libnftables.so.1 (libnftables(3)).

libnftables opens its netlink socket in ``nft_ctx_new`` with flags
``NFT_CTX_DEFAULT`` (src/libnftables.c, nftables 1.0.x), in the network
namespace of the calling thread, so a context is created and used on a
thread that has entered the namespace (:func:`tracer.netns.run_in`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Self

from tracer import netns
from tracer.errors import CannotTraceError

log = logging.getLogger(__name__)

LIBRARY = "libnftables.so.1"

# enum nft_ctx_output_flags (include/nftables/libnftables.h).
OUTPUT_HANDLE = 1 << 3
OUTPUT_JSON = 1 << 4

_lib: ctypes.CDLL | None = None
# Held around every libnftables call that creates, uses or frees a context:
# the snapshot lists rulesets from several threads at once, and libnftables
# keeps global state besides its contexts (nft_ctx_new sets up the library
# on first use; src/libnftables.c).
_lock = threading.Lock()


class NftError(Exception):
    """A command that libnftables refused, with its error text."""


def library() -> ctypes.CDLL:
    """libnftables, loaded once, with the prototypes this module calls."""
    global _lib
    if _lib is not None:
        return _lib
    try:
        lib = ctypes.CDLL(LIBRARY)
    except OSError as err:
        raise CannotTraceError(
            f"cannot load {LIBRARY} ({err}); install it: apt-get install libnftables1"
        ) from err
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.restype = None
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
    lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_set_flags.restype = None
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
        getattr(lib, name).restype = ctypes.c_char_p
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    _lib = lib
    return lib


def _socket_fds() -> set[int]:
    """This process's open descriptors that are sockets."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                found.add(int(name))
        except OSError:
            continue  # closed meanwhile, or the listing's own descriptor
    return found


def ruleset_json() -> str:
    """`nft -j list ruleset` for the calling thread's namespace, in-process.

    The snapshot's listing: starting `nft` for it took 15 ms for the
    tutorial's five namespaces, this 4 ms, with the same JSON. The context
    lives only as long as the listing and owns no table, so freeing it
    waits for nothing.
    """
    lib = library()
    with _lock:
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise NftError("libnftables could not open a netlink socket")
        try:
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            lib.nft_ctx_output_set_flags(ctx, OUTPUT_JSON)
            code = lib.nft_run_cmd_from_buffer(ctx, b"list ruleset")
            out = lib.nft_ctx_get_output_buffer(ctx) or b""
            err = lib.nft_ctx_get_error_buffer(ctx) or b""
        finally:
            lib.nft_ctx_free(ctx)
    if code != 0:
        raise NftError(err.decode(errors="replace").strip() or f"nft failed: {code}")
    return out.decode(errors="replace")


class Nft:
    """One libnftables context, and its netlink socket, in namespace *ns*.

    Every call runs on a thread inside the namespace, so whichever socket
    libnftables uses belongs there. :meth:`close` frees the context and so
    closes the socket: tables created with the ``owner`` flag go with it.
    """

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self._lib = library()
        self._socket_fds: list[int] = []
        self._ctx: int | None = netns.run_in(ns, self._new)

    def _new(self) -> int:
        with _lock:
            before = _socket_fds()
            ctx = self._lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT: opens the socket
            # The one socket libnftables opened, found by its appearance:
            # nstrace opens nothing else meanwhile (see release_socket).
            new = sorted(_socket_fds() - before)
            if ctx:
                self._lib.nft_ctx_buffer_output(ctx)
                self._lib.nft_ctx_buffer_error(ctx)
        self._socket_fds = new if len(new) == 1 else []
        if not ctx:
            raise CannotTraceError(
                f"libnftables could not open a netlink socket in namespace {self.ns} "
                "(run nstrace as root)"
            )
        return ctx

    def run(
        self, commands: str, json_output: bool = False, handles: bool = False
    ) -> str:
        """Run nft commands (nft(8) syntax); return what they printed."""
        if self._ctx is None:
            raise NftError(f"the nftables context of namespace {self.ns} is closed")
        ctx = self._ctx
        flags = (OUTPUT_JSON if json_output else 0) | (OUTPUT_HANDLE if handles else 0)

        def body() -> tuple[int, bytes, bytes]:
            with _lock:
                self._lib.nft_ctx_output_set_flags(ctx, flags)
                code = self._lib.nft_run_cmd_from_buffer(ctx, commands.encode())
                out = self._lib.nft_ctx_get_output_buffer(ctx) or b""
                err = self._lib.nft_ctx_get_error_buffer(ctx) or b""
            return code, out, err

        code, out, err = netns.run_in(self.ns, body)
        if code != 0:
            raise NftError(
                err.decode(errors="replace").strip() or f"nft failed: {code}"
            )
        return out.decode(errors="replace")

    def ruleset_text(self) -> str:
        """`nft -a list ruleset`: nft syntax, each rule ending ``# handle N``."""
        return self.run("list ruleset", handles=True)

    def release_socket(self) -> None:
        """Let go of the context's netlink socket now, before :meth:`close`.

        The kernel deletes owner tables when their socket is released, which
        blocks the releasing call for an RCU grace period (nft_rcv_nl_event,
        net/netfilter/nf_tables_api.c), about 10 ms. This is a system call
        only, no libnftables code (whose global state is not thread-safe),
        so namespaces can be released side by side on threads. The socket's
        descriptor is replaced by /dev/null rather than closed, so that the
        number cannot be reused before libnftables closes it in ``close``.
        """
        fds, self._socket_fds = self._socket_fds, []
        if not fds:
            return
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for fd in fds:
                os.dup2(null, fd)
        finally:
            os.close(null)

    def close(self) -> None:
        if self._ctx is not None:
            with _lock:
                self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
