"""Docker containers as endpoints: a container name works like a namespace name.

A running container's network namespace is the one of its main process:
`docker inspect -f {{.State.Pid}} NAME` gives the process id and
/proc/PID/ns/net is the namespace (docs.docker.com, "docker container
inspect"; man 7 namespaces). nstrace asks the docker command line rather
than the engine's socket, so it works with whatever context and socket the
user's `docker` is set up for, and needs no Docker library.

A resolved container is registered with :func:`tracer.netns.register` under
its name, so that events in its namespace are shown with that name and the
rest of the pipeline treats it like any named namespace. Where no engine
runs (or no docker command exists), a name that is neither a namespace nor a
container is one clear error.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

from tracer import netns
from tracer.errors import UsageError

log = logging.getLogger(__name__)

DOCKER = "docker"
INSPECT_TIMEOUT_S = 10.0
_NO_ENGINE = ("Cannot connect to the Docker daemon", "Is the docker daemon running")
_NO_CONTAINER = ("No such object", "No such container")


def _not_found(name: str, why: str) -> UsageError:
    return UsageError(
        f"{name} does not exist: it is neither a network namespace (see `ip netns "
        f"list`) nor a Docker container ({why}); build the lab with `nstrace lab up` "
        "or start the container"
    )


def container_pid(name: str) -> int:
    """The host pid of running container *name*, or a UsageError saying why not."""
    docker = shutil.which(DOCKER)
    if docker is None:
        raise _not_found(name, "there is no docker command here")
    argv = [docker, "inspect", "--type", "container", "-f", "{{.State.Pid}}", name]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=INSPECT_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise _not_found(
            name, f"`docker inspect` took over {INSPECT_TIMEOUT_S:g}s"
        ) from None
    message = " ".join(done.stderr.split())
    if done.returncode != 0:
        if any(text in message for text in _NO_ENGINE):
            raise _not_found(name, "no Docker engine is running here")
        if any(text in message for text in _NO_CONTAINER):
            raise _not_found(name, "Docker knows no container of that name")
        raise _not_found(name, f"docker inspect failed: {message or done.returncode}")
    try:
        pid = int(done.stdout.strip())
    except ValueError:
        raise _not_found(name, f"docker inspect said {done.stdout.strip()!r}") from None
    if pid <= 0:
        raise UsageError(
            f"container {name} is not running; start it (`docker start {name}`)"
        )
    return pid


def resolve(name: str) -> str:
    """Register container *name*'s namespace under its name and return the name."""
    pid = container_pid(name)
    path = f"/proc/{pid}/ns/net"
    if not os.path.exists(path):
        raise UsageError(
            f"container {name} runs as pid {pid}, but {path} is not visible here "
            "(run nstrace in the host's pid namespace, as root)"
        )
    log.info("container %s: pid %d, namespace %s", name, pid, path)
    netns.register(name, path)
    return name
