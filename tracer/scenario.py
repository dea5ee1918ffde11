"""Lab scenarios: a topology, the steps that change it, and what each step expects.

A scenario file (YAML) lists the network namespaces the lab owns, the
commands that build the machine the tutorial starts from, and numbered steps.
Step 0 is the tutorial's starting point; step N means steps 0..N applied.
Every command names the namespace it runs in and is written as the tutorial
writes it::

    namespaces: [internet, host, RED]
    machine:
      - host: ip link set lo up
    steps:
      - step: 0
        title: the bridge from part 3
        apply:
          - host: ip link add reth0 netns RED type veth peer name reth1
        probes:
          - {from: RED, to: 11.11.11.3, expect: {outcome: reply}}

Commands are split with shlex and never pass through a shell. Only a few
programs may run (:data:`PROGRAMS`), and they may only point at namespaces of
the scenario, so that a scenario cannot change the namespace nstrace runs in.
Probe expectations are a mapping under ``expect``; :data:`EXPECT_KEYS` holds a
checker per key, and a new kind of expectation is one more entry there.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tracer import netns
from tracer.errors import UsageError

log = logging.getLogger(__name__)

# tracer/ has no __init__.py of its own to ask, so this module's file is the
# anchor: the repository is the directory above tracer/.
SCENARIO_DIR = Path(__file__).resolve().parents[1] / "scenarios"
DEFAULT = "tutorial"

PROGRAMS = ("ip", "iptables", "nft", "sysctl")
PROTOS = ("icmp", "tcp", "udp")
OUTCOMES = ("reply", "dropped", "no-reply", "unreachable", "error")

# sysctl keys that belong to a network namespace; others (kernel.*, vm.*, and
# some net.core.* knobs) are global and would change the whole machine.
_SYSCTL_PREFIXES = ("net.ipv4.", "net.ipv6.", "net.bridge.", "net.netfilter.")
_SYSCTL_OPTIONS = ("-w", "-q", "-e")
# ip options that reach another namespace or read commands from a file. ip
# accepts any prefix of an option's name (iproute2's matches()).
_IP_ESCAPES = re.compile(r"^--?(n(e(t(n(s)?)?)?)?|a(l(l)?)?|b(a(t(c(h)?)?)?)?)$")

_TOP_KEYS = ("name", "title", "story", "namespaces", "machine", "steps")
_STEP_KEYS = ("step", "title", "story", "apply", "probes")
_PROBE_KEYS = ("from", "to", "proto", "port", "expect")


@dataclass(frozen=True)
class Command:
    """One command of the lab, run inside namespace *netns*."""

    netns: str
    text: str
    argv: tuple[str, ...]
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.netns}: {self.text}"


@dataclass(frozen=True)
class Probe:
    """A packet to send at a step, and what must happen to it."""

    src: str  # a namespace of the scenario (`from` in the file)
    dst: str  # an IPv4 address or a namespace of the scenario (`to`)
    expect: dict[str, Any]
    proto: str = "icmp"
    port: int | None = None
    line: int | None = None

    def __str__(self) -> str:
        port = f":{self.port}" if self.port else ""
        return f"{self.src} -> {self.dst}{port} ({self.proto})"


@dataclass(frozen=True)
class Step:
    number: int
    title: str
    story: str
    apply: tuple[Command, ...]
    probes: tuple[Probe, ...]


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    story: str
    path: Path
    digest: str  # sha256 of the file, to notice that a built lab is stale
    namespaces: tuple[str, ...]
    machine: tuple[Command, ...]
    steps: tuple[Step, ...]

    @property
    def last(self) -> int:
        return len(self.steps) - 1

    def step(self, number: int) -> Step:
        """Step *number*, or a UsageError naming the steps there are."""
        if isinstance(number, bool) or not 0 <= number <= self.last:
            raise UsageError(
                f"scenario {self.name} has steps 0 to {self.last}, not {number}"
            )
        return self.steps[number]


def command(chosen: Scenario, netns_name: str, text: str) -> Command:
    """A command for one of *chosen*'s namespaces, checked as a scenario's are.

    For graders and tests that change a lab beyond its steps (the pytest
    plugin's ``nslab.run``): the same programs and the same limits apply.
    """
    checker = _Checker(chosen.path)
    checker.namespaces = chosen.namespaces
    entry = _LineDict({netns_name: text})
    entry.line, entry.key_lines = None, {}
    try:
        return checker.command(entry, entry, "command")
    except UsageError as exc:
        # Not a file's line: drop the "path:" the checker put in front.
        raise UsageError(str(exc).removeprefix(f"{chosen.path}: ")) from None


def default_scenario() -> Scenario:
    """The tutorial of LAB.md, which the demo and the tests use."""
    return load(DEFAULT)


def load(path_or_name: str | Path) -> Scenario:
    """Read and check a scenario given as a file path or a bare name.

    A bare name such as ``tutorial`` means ``scenarios/tutorial.yaml`` of this
    repository. Every problem is a UsageError naming the file and the fix.
    """
    path = _resolve(path_or_name)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror})") from None
    data = _parse(path, raw)
    return _Checker(path).scenario(data, hashlib.sha256(raw).hexdigest())


def _resolve(path_or_name: str | Path) -> Path:
    text = str(path_or_name)
    if (
        isinstance(path_or_name, Path)
        or "/" in text
        or text.endswith((".yaml", ".yml"))
    ):
        path = Path(text)
        if not path.is_file():
            raise UsageError(f"{path}: no such scenario file (check the path)")
        return path
    path = SCENARIO_DIR / f"{text}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml")))
        raise UsageError(
            f"no scenario named {text!r} (known: {known or 'none'}); "
            "or give the path of a .yaml file"
        )
    return path


class _LineDict(dict):
    """A YAML mapping that remembers its line and the line of each key."""

    line: int | None = None
    key_lines: dict[Any, int]


class _Loader(yaml.SafeLoader):
    """SafeLoader whose mappings carry their line and refuse duplicate keys."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode):
    data = _LineDict()
    data.line = node.start_mark.line + 1
    data.key_lines = {}
    yield data
    for key_node, _ in node.value:
        key = key_node.value
        if key in data.key_lines:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        data.key_lines[key] = key_node.start_mark.line + 1
    data.update(loader.construct_mapping(node))


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def _parse(path: Path, raw: bytes) -> Any:
    try:
        return yaml.load(raw, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{where}: not valid YAML: {problem}") from None


class _Checker:
    """Turns parsed YAML into a Scenario, or fails on the first problem."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.namespaces: tuple[str, ...] = ()

    def fail(self, node: Any, message: str, key: str | None = None) -> UsageError:
        """An error at *node*'s line, or at the line of its *key*."""
        line = getattr(node, "key_lines", {}).get(key) or getattr(node, "line", None)
        where = f"{self.path}:{line}" if line else str(self.path)
        return UsageError(f"{where}: {message}")

    def mapping(self, node: Any, what: str, known: tuple[str, ...]) -> dict:
        if not isinstance(node, dict):
            raise self.fail(node, f"{what} must be a mapping of {', '.join(known)}")
        for key in node:
            if key not in known:
                raise self.fail(
                    node,
                    f"{what} has unknown key {key!r} (known: {', '.join(known)})",
                    key,
                )
        return node

    def text(self, node: dict, key: str, what: str, default: str = "") -> str:
        value = node.get(key, default)
        if not isinstance(value, str):
            raise self.fail(node, f"{what}: {key} must be text")
        return value.strip()

    def listing(self, node: dict, key: str, what: str) -> list:
        value = node.get(key) or []
        if not isinstance(value, list):
            raise self.fail(node, f"{what}: {key} must be a list")
        return value

    def scenario(self, data: Any, digest: str) -> Scenario:
        top = self.mapping(data, "the scenario", _TOP_KEYS)
        self.namespaces = self.namespace_names(top)
        steps = self.listing(top, "steps", "the scenario")
        if not steps:
            raise self.fail(top, "the scenario has no steps (add `steps:`)")
        return Scenario(
            name=self.text(top, "name", "the scenario", self.path.stem),
            title=self.text(top, "title", "the scenario"),
            story=self.text(top, "story", "the scenario"),
            path=self.path.resolve(),
            digest=digest,
            namespaces=self.namespaces,
            machine=self.commands(top, "machine", "the machine"),
            steps=tuple(self.step(node, i) for i, node in enumerate(steps)),
        )

    def namespace_names(self, top: dict) -> tuple[str, ...]:
        names = self.listing(top, "namespaces", "the scenario")
        if not names:
            raise self.fail(top, "the scenario lists no namespaces")
        for name in names:
            if not isinstance(name, str) or name == netns.ROOT:
                raise self.fail(top, f"{name!r} cannot name a lab namespace")
            try:
                netns.check_name(name)
            except UsageError as exc:
                raise self.fail(top, str(exc)) from None
        if len(set(names)) != len(names):
            raise self.fail(top, "a namespace is listed twice under namespaces")
        return tuple(names)

    def step(self, node: Any, index: int) -> Step:
        what = f"step {index}"
        self.mapping(node, what, _STEP_KEYS)
        number = node.get("step")
        if number is None:
            raise self.fail(node, f"{what} has no number (add `step: {index}`)")
        if number != index or isinstance(number, bool):
            raise self.fail(
                node,
                f"step {number!r} is out of order: steps count up from 0, "
                f"so this one must be `step: {index}`",
            )
        probes = self.listing(node, "probes", what)
        return Step(
            number=index,
            title=self.text(node, "title", what),
            story=self.text(node, "story", what),
            apply=self.commands(node, "apply", what),
            probes=tuple(
                self.probe(p, f"{what}, probe {i + 1}") for i, p in enumerate(probes)
            ),
        )

    def commands(self, node: dict, key: str, what: str) -> tuple[Command, ...]:
        return tuple(self.command(c, node, what) for c in self.listing(node, key, what))

    def command(self, entry: Any, parent: dict, what: str) -> Command:
        if not isinstance(entry, dict) or len(entry) != 1:
            raise self.fail(
                parent, f"{what}: each command is `NAMESPACE: command`, got {entry!r}"
            )
        ((name, text),) = entry.items()
        if name not in self.namespaces:
            raise self.fail(
                entry, f"{what}: {name!r} is not one of the scenario's namespaces"
            )
        if not isinstance(text, str):
            raise self.fail(entry, f"{what}: the command for {name} must be text")
        try:
            argv = tuple(shlex.split(text))
        except ValueError as exc:
            raise self.fail(entry, f"{what}: cannot split {text!r}: {exc}") from None
        problem = self.unsafe(argv)
        if problem:
            raise self.fail(entry, f"{what}: `{text}` {problem}")
        return Command(name, text.strip(), argv, entry.line)

    def unsafe(self, argv: tuple[str, ...]) -> str | None:
        """Why *argv* may not run in a lab namespace, or None if it may."""
        if not argv:
            return "is empty"
        if argv[0] not in PROGRAMS:
            return f"runs {argv[0]!r}; only {', '.join(PROGRAMS)} may run"
        if argv[0] == "ip":
            return self.unsafe_ip(argv)
        if argv[0] == "sysctl":
            return _unsafe_sysctl(argv)
        return None

    def unsafe_ip(self, argv: tuple[str, ...]) -> str | None:
        words = [a for a in argv[1:] if not a.startswith("-")]
        if words and words[0] == "netns":
            return "manages namespaces; the lab makes those listed under namespaces"
        if any(_IP_ESCAPES.match(a) for a in argv[1:]):
            return "uses an ip option that leaves the namespace (-n, -all, -batch)"
        for i, word in enumerate(argv):
            target = argv[i + 1] if i + 1 < len(argv) else None
            if word == "netns" and target not in self.namespaces:
                return f"moves a link to {target!r}, not to a lab namespace"
        return None

    def probe(self, node: Any, what: str) -> Probe:
        self.mapping(node, what, _PROBE_KEYS)
        src, dst = node.get("from"), node.get("to")
        if src not in self.namespaces:
            raise self.fail(node, f"{what}: from must be a namespace of the scenario")
        if dst not in self.namespaces and not _is_ipv4(dst):
            raise self.fail(
                node, f"{what}: to must be an IPv4 address or a namespace, not {dst!r}"
            )
        proto = node.get("proto", "icmp")
        if proto not in PROTOS:
            raise self.fail(node, f"{what}: proto must be one of {', '.join(PROTOS)}")
        port = node.get("port")
        if port is not None and (
            proto == "icmp" or not isinstance(port, int) or not 0 < port < 65536
        ):
            raise self.fail(node, f"{what}: port must be 1..65535, for tcp or udp")
        return Probe(
            src, str(dst), self.expectation(node, what), proto, port, node.line
        )

    def expectation(self, probe: dict, what: str) -> dict[str, Any]:
        expect = probe.get("expect")
        what = f"{what}: expect"
        self.mapping(expect, what, tuple(EXPECT_KEYS))
        if not expect:
            raise self.fail(probe, f"{what} is empty (say at least `outcome: reply`)")
        for key, value in expect.items():
            problem = EXPECT_KEYS[key](value)
            if problem:
                node = _item_node(value, problem)
                if node is not None:  # a mapping in a block list: its own line
                    raise self.fail(node, f"{what}: {key} {problem}")
                raise self.fail(expect, f"{what}: {key} {problem}", key)
            for name in expected_namespaces(key, value):
                if name not in self.namespaces:
                    raise self.fail(
                        expect,
                        f"{what}: {key} names {name!r}, which is not one of the "
                        f"scenario's namespaces ({', '.join(self.namespaces)})",
                        key,
                    )
        return dict(expect)


def _item_node(value: Any, problem: str) -> Any:
    """The list item a problem ("item N: ...") is about, if it knows its line."""
    match = re.match(r"item (\d+):", problem)
    if not match or not isinstance(value, list):
        return None
    item = value[int(match.group(1)) - 1]
    return item if getattr(item, "line", None) else None


def _unsafe_sysctl(argv: tuple[str, ...]) -> str | None:
    for arg in argv[1:]:
        if arg.startswith("-"):
            if arg not in _SYSCTL_OPTIONS:
                return (
                    f"uses sysctl option {arg} (allowed: {' '.join(_SYSCTL_OPTIONS)})"
                )
        elif not arg.startswith(_SYSCTL_PREFIXES):
            return f"sets {arg.split('=')[0]}, which is not a per-namespace setting"
    return None


def _is_ipv4(value: Any) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


def _one_outcome(value: Any) -> str | None:
    if value in OUTCOMES:
        return None
    return f"must be one of {', '.join(OUTCOMES)}, not {value!r}"


def _outcomes(value: Any) -> str | None:
    values = value if isinstance(value, list) else [value]
    return next(filter(None, map(_one_outcome, values)), None)


class BadExpectation(ValueError):
    """What is wrong with one expectation's value (becomes a UsageError)."""


# Hook names as the kernel's netfilter hooks are called in iptables (and in
# the bridge family's nftables chains, written there in lower case).
HOOKS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
DIRECTIONS = ("request", "reply")
FAMILIES = ("ip", "bridge")
NAT_FIELDS = ("src", "dst")
_CAUSE_CODE = re.compile(r"^[a-z][a-z0-9-]*$")
_HOOK_KEYS = ("netns", "hook", "dir", "family")
_DROP_KEYS = ("netns", "hook", "dir", "reason", "dev")
_NAT_KEYS = ("netns", "hook", "dir", "field", "from", "to")
_CAUSE_KEYS = ("code", "netns")


def hook_pattern(value: Any) -> dict[str, str]:
    """A hook crossing as a mapping: ``{netns, hook, dir?, family?}``.

    The short form is a string ``"NETNS HOOK [DIR] [FAMILY]"``, for example
    ``host FORWARD reply``. Raises BadExpectation saying what is wrong.
    """
    if isinstance(value, str):
        words = value.split()
        if not 2 <= len(words) <= 4:
            raise BadExpectation(
                f"{value!r} is not `NETNS HOOK [DIR] [FAMILY]` (e.g. host FORWARD reply)"
            )
        value = dict(zip(_HOOK_KEYS, words))
    if not isinstance(value, dict):
        raise BadExpectation(f"{value!r} is neither `NETNS HOOK [DIR]` nor a mapping")
    pattern = _known_keys(value, _HOOK_KEYS)
    for key in ("netns", "hook"):
        if key not in pattern:
            raise BadExpectation(f"{value!r} has no {key}")
    return _checked_fields(pattern)


def _known_keys(value: dict, known: tuple[str, ...]) -> dict[str, str]:
    for key in value:
        if key not in known:
            raise BadExpectation(f"unknown key {key!r} (known: {', '.join(known)})")
    return {key: str(item) for key, item in value.items()}


def _checked_fields(pattern: dict[str, str]) -> dict[str, str]:
    """Upper-case the hook name, and check the fields with a fixed vocabulary."""
    if "hook" in pattern:
        pattern["hook"] = pattern["hook"].upper()
    choices = {"hook": HOOKS, "dir": DIRECTIONS, "family": FAMILIES}
    choices["field"] = NAT_FIELDS
    for key, allowed in choices.items():
        if key in pattern and pattern[key] not in allowed:
            raise BadExpectation(
                f"{key} {pattern[key]!r} is not one of {', '.join(allowed)}"
            )
    for key in ("from", "to"):
        if key in pattern and not _is_ipv4(pattern[key]):
            raise BadExpectation(f"{key} {pattern[key]!r} is not an IPv4 address")
    return pattern


def drop_pattern(value: Any) -> dict[str, str] | None:
    """The drop point to expect, or None for "nothing may be dropped"."""
    if value is None or value is False:
        return None
    if not isinstance(value, dict) or not value:
        raise BadExpectation("must be a mapping of netns, hook, dir, reason, or null")
    return _checked_fields(_known_keys(value, _DROP_KEYS))


def nat_patterns(value: Any) -> list[dict[str, str]]:
    """Rewrites to expect; an empty list means no rewrite at all."""
    items = value if isinstance(value, list) else [value]
    patterns = []
    for number, item in enumerate(items, 1):
        if not isinstance(item, dict) or not item:
            raise BadExpectation(
                f"item {number} must be a mapping of {', '.join(_NAT_KEYS)}"
            )
        try:
            patterns.append(_checked_fields(_known_keys(item, _NAT_KEYS)))
        except BadExpectation as exc:
            raise BadExpectation(f"item {number}: {exc}") from None
    return patterns


def hook_patterns(value: Any) -> list[dict[str, str]]:
    """One hook crossing or a list of them, as mappings (see hook_pattern)."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise BadExpectation("is an empty list (name at least one hook)")
    patterns = []
    for number, item in enumerate(items, 1):
        try:
            patterns.append(hook_pattern(item))
        except BadExpectation as exc:
            raise BadExpectation(f"item {number}: {exc}") from None
    return patterns


def cause_pattern(value: Any) -> dict[str, str]:
    """A cause code, alone or as ``{code, netns}``."""
    pattern = {"code": value} if isinstance(value, str) else value
    if not isinstance(pattern, dict):
        raise BadExpectation(
            "must be a cause code such as filter-drop, or {code, netns}"
        )
    pattern = _known_keys(pattern, _CAUSE_KEYS)
    if not _CAUSE_CODE.match(pattern.get("code", "")):
        raise BadExpectation(
            f"code {pattern.get('code')!r} is not a cause code (e.g. no-snat)"
        )
    return pattern


def _reading(parse: Callable[[Any], Any]) -> Callable[[Any], str | None]:
    """A checker for EXPECT_KEYS made of a parser that raises BadExpectation."""

    def check(value: Any) -> str | None:
        try:
            parse(value)
        except BadExpectation as exc:
            return str(exc)
        return None

    return check


def expected_namespaces(key: str, value: Any) -> list[str]:
    """The namespaces an (already checked) expectation names."""
    if key in ("crossed", "not_crossed"):
        return [p["netns"] for p in hook_patterns(value)]
    if key == "nat":
        return [p["netns"] for p in nat_patterns(value) if "netns" in p]
    pattern = (
        drop_pattern(value)
        if key == "drop"
        else cause_pattern(value)
        if key == "cause"
        else None
    )
    return [pattern["netns"]] if pattern and "netns" in pattern else []


# One checker per expectation key: it returns what is wrong with a value, or
# None. tracer/check.py holds the reader that compares each key with a trace;
# a new kind of expectation is one entry here and one there (a unit test
# keeps the two lists equal). scenarios/README.md documents every key.
EXPECT_KEYS: dict[str, Callable[[Any], str | None]] = {
    "outcome": _one_outcome,
    "outcome_not": _outcomes,  # one outcome or a list of them
    "crossed": _reading(hook_patterns),  # hooks the packet got through
    "not_crossed": _reading(hook_patterns),  # hooks it must not get through
    "drop": _reading(drop_pattern),  # where it must die, or null: nowhere
    "nat": _reading(nat_patterns),  # rewrites that must happen; [] for none
    "cause": _reading(cause_pattern),  # the explanation's cause code
}
