"""Network namespaces: find them by name, and run code inside them.

A network namespace is named the way `ip netns` names it (a file under
/run/netns), or `root` for the namespace nstrace itself was started in (PID
1's may be unreadable even to root inside a container, so it is not used). Code runs inside a
namespace on a thread of its own that calls setns(2) and then ends: setns
moves only the calling thread (man 2 setns), so the main thread never leaves
the namespace it started in and a failure cannot strand it elsewhere.
Sockets and BPF netfilter links keep the namespace they were created in.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
from collections.abc import Callable
from typing import TypeVar

from tracer.errors import UsageError

log = logging.getLogger(__name__)

NETNS_RUN_DIR = "/run/netns"
ROOT = "root"
# Resolved at import, before any thread can have moved: the main thread never
# calls setns, so this is the namespace nstrace was started in.
ROOT_PATH = f"/proc/{os.getpid()}/ns/net"
CLONE_NEWNET = 0x40000000

# What `ip netns add` accepts, minus anything that could be read as a path.
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

_libc = ctypes.CDLL(None, use_errno=True)

T = TypeVar("T")

# Namespaces known by a name but held elsewhere than /run/netns: Docker
# containers (/proc/PID/ns/net), registered by tracer.docker.
_REGISTERED: dict[str, str] = {}


def check_name(name: str) -> str:
    """Return *name* if it can name a namespace, else raise UsageError."""
    if not _NAME.match(name) or name in (".", ".."):
        raise UsageError(
            f"{name!r} is not a valid namespace name "
            "(use letters, digits, '.', '_' or '-', at most 64 characters)"
        )
    return name


def register(name: str, path: str) -> None:
    """Let *name* stand for the namespace at *path* (a container's, say)."""
    _REGISTERED[check_name(name)] = path


def path_of(name: str) -> str:
    """The file that holds namespace *name* (`root` is nstrace's own)."""
    if name == ROOT:
        return ROOT_PATH
    if name in _REGISTERED:
        return _REGISTERED[name]
    check_name(name)
    path = os.path.join(NETNS_RUN_DIR, name)
    if not os.path.exists(path):
        raise UsageError(f"namespace {name} does not exist (see `ip netns list`)")
    return path


def exists(name: str) -> bool:
    if name == ROOT or name in _REGISTERED:
        return True
    return os.path.exists(os.path.join(NETNS_RUN_DIR, name))


def inode_of(name: str) -> int:
    """The namespace's inode number, as BPF sees it in `net->ns.inum`."""
    return os.stat(path_of(name)).st_ino


def list_named() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def names_by_inode() -> dict[int, str]:
    """Every known namespace by inode: the named ones and `root`."""
    table = {}
    for name in list_named():
        try:
            table[os.stat(os.path.join(NETNS_RUN_DIR, name)).st_ino] = name
        except OSError:
            continue
    # A registered name is the one the user typed: it wins over another name
    # for the same namespace.
    for name, path in _REGISTERED.items():
        try:
            table[os.stat(path).st_ino] = name
        except OSError:
            continue
    table.setdefault(os.stat(ROOT_PATH).st_ino, ROOT)
    return table


def run_in(name_or_path: str, func: Callable[[], T]) -> T:
    """Run *func* on a thread that has entered the namespace, return its result.

    *name_or_path* is a namespace name or a path such as /proc/PID/ns/net.
    Exceptions raised by *func* are raised again in the caller.
    """
    path = name_or_path if "/" in name_or_path else path_of(name_or_path)
    result: list = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(func())
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller)
            failure.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{name_or_path}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]
