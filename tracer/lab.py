"""The sandbox lab: a scenario built in network namespaces of its own.

Theory of operation. The lab owns the namespaces its scenario lists and
nothing else. Every command runs inside one of them (`ip netns exec NS ...`),
veth pairs are made from inside a lab namespace with their peer sent straight
to another, so no link, address, route, rule or sysctl of the namespace
nstrace runs in is ever touched.

The state file (/run/nstrace/lab.json) is the lab's memory. It is rewritten
before each namespace is created, so whatever exists was listed first and
`down` can remove it even after a crash halfway through `up`. It also records
the scenario (path and digest), the last step fully applied, and whether a
build was under way; a lab found mid-build is rebuilt, never trusted. A
namespace of the scenario's name that the state file does not list belongs to
someone else, and the lab refuses to touch it.

Moving forward applies the missing steps (`goto`); `up` and moving backward
rebuild from nothing, because commands such as `iptables -A` cannot be undone
by replaying anything. A failed build is torn down before the error is raised.
A lock file serialises lab changes between processes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tracer import netns
from tracer.errors import LabError
from tracer.events import ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_ERRORS
from tracer.scenario import Command, Scenario

log = logging.getLogger(__name__)

STATE_DIR = Path("/run/nstrace")
STATE_FILE = STATE_DIR / "lab.json"
LOCK_FILE = STATE_DIR / "lab.lock"

COMMAND_TIMEOUT = 20.0  # seconds; an ip or iptables call takes milliseconds
BRIDGE_NF_IPTABLES = "net.bridge.bridge-nf-call-iptables"


@dataclass
class LabState:
    """What the lab has built, as kept in the state file."""

    scenario: str
    path: str
    digest: str
    namespaces: list[str] = field(default_factory=list)
    step: int = -1  # the last step fully applied; -1 while the machine is built
    building: bool = True  # a change is under way (or died half way)

    def matches(self, scenario: Scenario) -> bool:
        """True if built from this very scenario file, unchanged since."""
        return self.path == str(scenario.path) and self.digest == scenario.digest

    def intact(self) -> bool:
        """True if no build is under way and every namespace still exists."""
        return not self.building and all(map(netns.exists, self.namespaces))


def up(scenario: Scenario, step: int | None = None) -> LabState:
    """Build the lab at *step* (0 when None): exactly that step, from scratch.

    Harmless when the lab is already intact at that step of that scenario;
    any other lab of ours is torn down first.
    """
    target = scenario.step(0 if step is None else step).number
    with _locked():
        return _up(scenario, target)


def goto(scenario: Scenario, step: int) -> LabState:
    """Move the lab to *step*: apply the missing steps, or rebuild if behind."""
    target = scenario.step(step).number
    with _locked():
        state = _read_state()
        if state and state.matches(scenario) and state.intact():
            for number in range(state.step + 1, target + 1):
                _apply_step(state, scenario, number)
            if state.step == target:
                return state
        return _up(scenario, target)


def apply_step(scenario: Scenario, number: int) -> LabState:
    """Apply step *number* to a lab that stands at step *number* - 1."""
    scenario.step(number)
    with _locked():
        state = _read_state()
        if state is None or not state.matches(scenario) or not state.intact():
            raise LabError(
                f"the {scenario.name} lab is not up; "
                f"run `nstrace lab up {scenario.name} --step {number}`"
            )
        if state.step != number - 1:
            raise LabError(
                f"step {number} needs the lab at step {number - 1}, it is at "
                f"{state.step}; run `nstrace lab up {scenario.name} --step {number}`"
            )
        _apply_step(state, scenario, number)
        return state


def down() -> list[str]:
    """Remove every namespace the lab made and its state; return their names."""
    with _locked():
        state = _read_state()
        return _teardown(state) if state else []


def status() -> dict[str, Any]:
    """The lab as the state file and the namespaces tell it, JSON-ready."""
    state = _read_state()
    if state is None:
        return {"up": False, "namespaces": []}
    missing = [ns for ns in state.namespaces if not netns.exists(ns)]
    return {
        "up": state.intact(),
        "scenario": state.scenario,
        "path": state.path,
        "step": state.step,
        "building": state.building,
        "namespaces": state.namespaces,
        "missing": missing,
    }


def current() -> LabState | None:
    """The state file's content, or None when no lab is up."""
    return _read_state()


def run_in_lab(
    ns: str, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run *argv* inside lab namespace *ns* and return the finished process.

    Only namespaces of the current lab are accepted, so a caller cannot run
    something in the root namespace by mistake. The exit code is not checked.
    """
    _check_lab_namespace(ns)
    return _run(["ip", "netns", "exec", ns, *argv], timeout)


def ping(ns: str, dst: str, timeout: float = 1.0) -> str:
    """Send one ICMP echo from lab namespace *ns*: reply, no-reply or unreachable.

    Uses iputils `ping` when it is installed, else an echo over a raw socket
    opened inside the namespace: the lab's own check, independent of the
    tracer. "unreachable" means refused before sending, or an ICMP error.
    """
    if shutil.which("ping"):
        argv = ["ping", "-n", "-c1", "-W", f"{timeout:g}", dst]
        done = run_in_lab(ns, argv, timeout + COMMAND_TIMEOUT)
        return _ping_outcome(done.returncode, done.stdout + done.stderr)
    _check_lab_namespace(ns)
    return netns.run_in(ns, lambda: raw_echo(dst, timeout))


def _check_lab_namespace(ns: str) -> None:
    state = _read_state()
    if state is None or ns not in state.namespaces:
        raise LabError(f"{ns} is not a namespace of the lab (see `nstrace lab status`)")


def _ping_outcome(returncode: int, output: str) -> str:
    if returncode == 0:
        return "reply"
    # "connect: Network is unreachable", or an ICMP error such as
    # "Destination Host Unreachable" from a router on the way.
    if "nreachable" in output:
        return "unreachable"
    if returncode == 1:
        return "no-reply"
    raise LabError(f"ping failed: {' '.join(output.split())}")


def raw_echo(dst: str, timeout: float = 1.0) -> str:
    """One ICMP echo from the calling thread's namespace, as `ping -c1` would."""
    ident = int.from_bytes(os.urandom(2), "big")
    payload = b"nstrace-lab-check"
    unsummed = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, 1) + payload
    header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, _checksum(unsummed), ident, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        try:
            sock.sendto(header + payload, (dst, 0))
        except OSError as exc:
            if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                return "unreachable"
            raise
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, (src, _) = sock.recvfrom(2048)
            except TimeoutError:
                break
            outcome = _echo_answer(data, ident, dst, src)
            if outcome:
                return outcome
    return "no-reply"


def _echo_answer(data: bytes, ident: int, dst: str, src: str) -> str | None:
    """reply or unreachable if *data* answers our echo, else None."""
    icmp = data[(data[0] & 0x0F) * 4 :]
    kind = icmp[0]
    if kind == ICMP_ECHO_REPLY and src == dst and icmp[4:6] == ident.to_bytes(2, "big"):
        return "reply"
    if kind in ICMP_ERRORS and len(icmp) >= 36:  # an error quoting our request
        inner = icmp[8:]
        quoted = inner[(inner[0] & 0x0F) * 4 :]
        if quoted[4:6] == ident.to_bytes(2, "big"):
            return "unreachable"
    return None


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data[: len(data) // 2 * 2]))
    if len(data) % 2:
        total += data[-1] << 8
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# Building and tearing down. Callers hold the lock.


def _up(scenario: Scenario, target: int) -> LabState:
    state = _read_state()
    if state and state.matches(scenario) and state.intact() and state.step == target:
        log.info("lab %s already up at step %d", scenario.name, target)
        return state
    if state:
        _teardown(state)
    _refuse_foreign(scenario)
    return _build(scenario, target)


def _refuse_foreign(scenario: Scenario) -> None:
    for ns in scenario.namespaces:
        if netns.exists(ns):
            raise LabError(
                f"namespace {ns} exists but the lab did not make it; remove it "
                f"(`ip netns del {ns}`) or rename it in {scenario.path}"
            )


def _build(scenario: Scenario, target: int) -> LabState:
    state = LabState(scenario.name, str(scenario.path), scenario.digest)
    log.info("lab %s: building up to step %d", scenario.name, target)
    with _torn_down_on_failure(state):
        for ns in scenario.namespaces:
            # Listed before it exists: a crash from here on leaves nothing
            # that `down` does not know about.
            state.namespaces.append(ns)
            _write_state(state)
            _check(["ip", "netns", "add", ns], f"creating namespace {ns}")
        for ns in scenario.namespaces:
            _bridge_netfilter_on(ns)
        _apply_commands(scenario.machine, "the machine")
        for number in range(target + 1):
            _apply_commands(scenario.steps[number].apply, f"step {number}")
            state.step = number
        state.building = False
        _write_state(state)
    return state


def _apply_step(state: LabState, scenario: Scenario, number: int) -> None:
    log.info("lab %s: applying step %d", scenario.name, number)
    state.building = True
    _write_state(state)
    with _torn_down_on_failure(state):
        _apply_commands(scenario.steps[number].apply, f"step {number}")
        state.step = number
        state.building = False
        _write_state(state)


@contextlib.contextmanager
def _torn_down_on_failure(state: LabState) -> Iterator[None]:
    """Remove what was built if the block fails, even on Ctrl-C."""
    try:
        yield
    except BaseException as exc:
        log.debug("lab build failed (%s); tearing down", exc)
        try:
            _teardown(state)
            after = "the lab was torn down"
        except LabError as teardown_error:
            after = f"tearing the lab down failed too: {teardown_error}"
        if isinstance(exc, LabError):
            raise LabError(f"{exc}; {after}") from None
        log.error("%s", after)
        raise


def _apply_commands(commands: Sequence[Command], where: str) -> None:
    for command in commands:
        _check(
            ["ip", "netns", "exec", command.netns, *command.argv], f"{where}, {command}"
        )


def _bridge_netfilter_on(ns: str) -> None:
    """Let bridged IPv4 reach iptables in *ns*, as on the tutorial's VM.

    The knob belongs to each namespace since Linux 5.3 ("netfilter: bridge:
    namespace bridge netfilter sysctls") and exists only when br_netfilter is
    loaded. Loading the module is not the lab's business: it would start
    filtering bridged traffic in every namespace of the machine.
    """
    done = _run(
        ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{BRIDGE_NF_IPTABLES}=1"]
    )
    if done.returncode != 0:
        log.warning(
            "%s: %s is missing (br_netfilter is not loaded), so bridged traffic "
            "will not cross iptables as in the tutorial",
            ns,
            BRIDGE_NF_IPTABLES,
        )


def _teardown(state: LabState) -> list[str]:
    removed = []
    for ns in reversed(state.namespaces):
        if netns.exists(ns):
            _check(["ip", "netns", "del", ns], f"removing namespace {ns}")
            removed.append(ns)
    STATE_FILE.unlink(missing_ok=True)
    log.info("lab %s down; removed %s", state.scenario, ", ".join(removed) or "nothing")
    return removed


def _check(argv: list[str], what: str) -> None:
    done = _run(argv)
    if done.returncode != 0:
        message = " ".join(done.stderr.split()) or f"exit code {done.returncode}"
        raise LabError(f"lab: {what} failed: {message}")


def _run(
    argv: list[str], timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    log.debug("run %s", argv)
    try:
        with _interrupts_held():
            return subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, check=False
            )
    except FileNotFoundError:
        raise LabError(f"{argv[0]} is not installed (install iproute2)") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"`{' '.join(argv)}` took longer than {timeout:g}s") from None


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while one command runs; deliver them after it.

    A KeyboardInterrupt raised while subprocess.Popen waits for its child to
    exec leaves the child running with nobody waiting for it (CPython 3.11,
    Popen._execute_child). An `ip netns add` cut off there made its namespace
    after the teardown had looked for it, and `lab down` knew nothing of it
    (seen as a `host` namespace left behind by tests/reliability/
    test_lab_interrupted.py). Each command now runs whole, for at most its
    timeout, and the signal reaches its own handler right after.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers run on the main thread only
        return
    held: list[int] = []
    previous = {
        sig: signal.getsignal(sig)
        for sig in (signal.SIGINT, signal.SIGTERM)
        if signal.getsignal(sig) is not None  # a handler Python did not set
    }
    for sig in previous:
        signal.signal(sig, lambda signum, _frame: held.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)


# The state file and the lock.


def _read_state() -> LabState | None:
    try:
        data = json.loads(STATE_FILE.read_text())
        return LabState(**data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise LabError(
            f"{STATE_FILE} is damaged ({exc}); remove the namespaces it lists "
            f"with `ip netns del`, then the file"
        ) from None


def _write_state(state: LabState) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    temporary = STATE_FILE.with_suffix(".tmp")
    temporary.write_text(json.dumps(asdict(state), indent=1) + "\n")
    # rename is atomic: a crash leaves the old state or the new, never half.
    os.replace(temporary, STATE_FILE)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
