"""Docker containers as endpoints, with a stand-in `docker` command.

This machine has the docker command but no engine, so the stand-in plays
the engine's answers to `docker inspect -f {{.State.Pid}} NAME`; the root
test gives it the pid of a process inside a lab namespace, which is what a
container is to the kernel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tracer import docker, netns
from tracer.errors import UsageError

FAKE_DOCKER = """\
#!/bin/sh
# docker inspect --type container -f {{.State.Pid}} NAME
for name; do :; done  # the last argument
case "$name" in
  web) cat "$(dirname "$0")/web.pid" ;;
  stopped) echo 0 ;;
  offline) echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. \
Is the docker daemon running?" >&2; exit 1 ;;
  *) echo "Error: No such object: $name" >&2; exit 1 ;;
esac
"""


@pytest.fixture
def fake_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `docker` first on PATH that knows the containers web and stopped."""
    script = tmp_path / "docker"
    script.write_text(FAKE_DOCKER)
    script.chmod(0o755)
    (tmp_path / "web.pid").write_text(f"{os.getpid()}\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    # Registered containers last as long as the process: forget them after.
    monkeypatch.setattr(netns, "_REGISTERED", {})
    return tmp_path


def test_running_container_is_its_process_namespace(fake_docker: Path):
    assert docker.container_pid("web") == os.getpid()
    assert docker.resolve("web") == "web"
    assert netns.exists("web")
    assert netns.path_of("web") == f"/proc/{os.getpid()}/ns/net"
    assert netns.names_by_inode()[netns.inode_of("web")] == "web"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("stopped", r"container stopped is not running; start it \(`docker start"),
        ("offline", r"offline does not exist: .*no Docker engine is running here"),
        ("ghost", r"ghost does not exist: .*Docker knows no container of that name"),
    ],
)
def test_what_docker_says_becomes_one_line(fake_docker: Path, name, message):
    with pytest.raises(UsageError, match=message) as caught:
        docker.resolve(name)
    assert "\n" not in str(caught.value)


def test_without_a_docker_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UsageError, match=r"there is no docker command here"):
        docker.resolve("web")


def test_nstrace_ping_names_neither_namespace_nor_container():
    # The real machine: a docker command, no engine (or no such container).
    done = subprocess.run(
        [sys.executable, "-m", "tracer.cli", "ping", "NOT-A-CONTAINER", "8.8.8.8"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "neither a network namespace" in done.stderr
    assert "Docker container" in done.stderr


@pytest.mark.root
@pytest.mark.nslab("docker", step=2)
def test_a_container_name_works_as_source_and_destination(nslab, fake_docker: Path):
    # "web" is a process in PINK's namespace, as a container's init would be.
    sleeper = subprocess.Popen(["ip", "netns", "exec", "PINK", "sleep", "60"])
    try:
        (fake_docker / "web.pid").write_text(f"{sleeper.pid}\n")
        _wait_for_namespace(sleeper.pid, netns.inode_of("PINK"))
        env = {**os.environ, "PATH": os.environ["PATH"]}
        out = _nstrace_json(env, "ping", "web", "8.8.8.8")
        assert out["outcome"] == "reply"
        assert out["probe"]["src_netns"] == "web"
        assert any(h["netns"] == "web" and h["dir"] == "reply" for h in out["hops"])
        back = _nstrace_json(env, "ping", "ORANGE", "web")
        assert back["probe"]["dst"] == "172.17.0.2"
        assert back["outcome"] == "reply"
    finally:
        sleeper.kill()
        sleeper.wait()


def _wait_for_namespace(pid: int, inode: int) -> None:
    # `ip netns exec` enters the namespace, then execs sleep: wait for it.
    for _ in range(200):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == inode:
                return
        except FileNotFoundError:
            pass
        subprocess.run(["sleep", "0.01"], check=True)
    raise AssertionError(f"pid {pid} never entered the namespace")


def _nstrace_json(env: dict, *args: str) -> dict:
    import json

    done = subprocess.run(
        [sys.executable, "-m", "tracer.cli", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)
