"""Bad input: one line that names the problem and the fix, exit 2, no traceback.

Each case is the command line (and environment) a user could type, the words
that must name the problem, and the words that must point at the fix. Cases
that need the lab's namespaces get the tutorial lab at step 0; "lab not up"
takes it down first.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from reliability.leftovers import nstrace_argv, run
from tracer import lab as lab_module

pytestmark = [pytest.mark.root]

LAB = "lab"  # the case needs RED and BLUE
NO_LAB = "no lab"  # the case needs the lab down
ANY = None

# (id, argv, environment, problem words, fix words, lab state)
# fmt: off
CASES = [
    ("unknown-namespace", ["ping", "NOPE", "8.8.8.8"], {},
     "NOPE does not exist", "nstrace lab up", LAB),
    ("unknown-watch-namespace", ["watch", "--netns", "NOPE"], {},
     "NOPE does not exist", "ip netns list", LAB),
    ("unknown-destination-name", ["ping", "RED", "PINK"], {},
     "PINK does not exist", "container", LAB),
    ("short-address", ["ping", "RED", "8.8.8"], {},
     "8.8.8 is not a valid IPv4 address", "a.b.c.d", LAB),
    ("octet-out-of-range", ["ping", "RED", "999.1.1.1"], {},
     "999.1.1.1 is not a valid IPv4 address", "a.b.c.d", LAB),
    ("ipv6-destination", ["ping", "RED", "::1"], {},
     "::1 is not an IPv4 address", "IPv4 only", LAB),
    ("watch-bad-host", ["watch", "--host", "300.1.1.1"], {},
     "'300.1.1.1' is not an IPv4 address", "give one like", ANY),
    ("watch-ipv6-host", ["watch", "--host", "fe80::1"], {},
     "fe80::1 is not an IPv4 address", "IPv4 only", ANY),
    ("unknown-protocol", ["ping", "RED", "8.8.8.8", "--proto", "sctp"], {},
     "unknown protocol 'sctp'", "use one of: icmp, tcp, udp", LAB),
    ("watch-unknown-protocol", ["watch", "--proto", "gre"], {},
     "unknown protocol 'gre'", "use one of: icmp, tcp, udp", ANY),
    ("port-too-big",
     ["ping", "RED", "8.8.8.8", "--proto", "tcp", "--port", "70000"],
     {},
     "port 70000 is out of range", "1 to 65535", LAB),
    ("port-zero", ["ping", "RED", "8.8.8.8", "--proto", "udp", "--port", "0"], {},
     "port 0 is out of range", "1 to 65535", LAB),
    ("port-not-a-number",
     ["ping", "RED", "8.8.8.8", "--proto", "tcp", "--port", "x"],
     {},
     "invalid int value: 'x'", "nstrace ping --help", ANY),
    ("watch-port-zero", ["watch", "--port", "0"], {},
     "'0' is not a port", "1 to 65535", ANY),
    ("icmp-with-port", ["ping", "RED", "8.8.8.8", "--port", "80"], {},
     "--port applies to tcp and udp", "add --proto tcp or udp", LAB),
    ("tcp-without-port", ["ping", "RED", "8.8.8.8", "--proto", "tcp"], {},
     "needs a destination port", "add --port N", LAB),
    ("watch-icmp-with-port", ["watch", "--proto", "icmp", "--port", "80"], {},
     "ICMP has no ports", "drop --port", ANY),
    ("negative-timeout", ["ping", "RED", "8.8.8.8", "--timeout", "-1"], {},
     "-1 is out of range", "between 0 and 3600", ANY),
    ("zero-timeout", ["ping", "RED", "8.8.8.8", "--timeout", "0"], {},
     "0 is out of range", "between 0 and 3600", ANY),
    ("timeout-not-a-number", ["ping", "RED", "8.8.8.8", "--timeout", "soon"], {},
     "'soon' is not a number of seconds", "nstrace ping --help", ANY),
    ("negative-duration", ["watch", "--duration", "-5"], {},
     "-5 is out of range", "between 0 and 3600", ANY),
    ("no-btf", ["ping", "RED", "11.11.11.3"], {"NSTRACE_BTF": "/nonexistent"},
     "kernel BTF /nonexistent is missing", "CONFIG_DEBUG_INFO_BTF=y", LAB),
    ("btf-not-btf", ["watch", "--host", "192.0.2.1"], {"NSTRACE_BTF": "/etc/hostname"},
     "/etc/hostname is not BTF", "check NSTRACE_BTF", ANY),
    ("bpf-object-missing",
     ["ping", "RED", "11.11.11.3"],
     {"NSTRACE_BPF_OBJECT": "/nonexistent"},
     "BPF object /nonexistent is missing", "make probes", LAB),
    ("bpf-object-not-elf",
     ["watch", "--host", "192.0.2.1"],
     {"NSTRACE_BPF_OBJECT": "/etc/hostname"},
     "BPF object /etc/hostname cannot be opened", "make probes", ANY),
    ("scenario-missing", ["lab", "up", "{tmp}/missing.yaml"], {},
     "no such scenario file", "check the path", ANY),
    ("scenario-not-yaml", ["lab", "up", "{tmp}/broken.yaml"], {},
     "not valid YAML", "broken.yaml:", ANY),
    ("scenario-unknown-key", ["lab", "up", "{tmp}/unknown.yaml"], {},
     "unknown key 'bogus'", "known: name, title", ANY),
    ("scenario-unknown-name", ["lab", "up", "nosuchscenario"], {},
     "no scenario named 'nosuchscenario'", "give the path of a .yaml file", ANY),
    ("check-scenario-missing", ["check", "{tmp}/missing.yaml"], {},
     "no such scenario file", "check the path", ANY),
    ("step-too-big", ["lab", "up", "--step", "99"], {},
     "has steps 0 to 7, not 99", "steps 0 to 7", ANY),
    ("step-negative", ["lab", "up", "--step", "-1"], {},
     "not -1", "steps 0 to 7", ANY),
    ("step-not-a-number", ["lab", "up", "--step", "two"], {},
     "invalid int value: 'two'", "nstrace lab up --help", ANY),
    ("lab-not-up", ["ping", "RED", "8.8.8.8"], {},
     "RED does not exist", "build the lab with `nstrace lab up`", NO_LAB),
    ("unknown-command", ["frobnicate"], {},
     "invalid choice: 'frobnicate'", "nstrace --help", ANY),
    ("missing-destination", ["ping", "RED"], {},
     "required: DST", "nstrace ping --help", ANY),
]
# fmt: on

SCENARIO_FILES = {
    "broken.yaml": "name: broken\nnamespaces: [A\n",
    "unknown.yaml": "name: x\nnamespaces: [A]\nbogus: 1\nsteps:\n  - step: 0\n",
}


def assert_one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("nstrace") and "error: " in done.stderr
    for word in words:
        assert word in done.stderr


@pytest.fixture
def scenario_files(tmp_path: Path) -> Path:
    for name, text in SCENARIO_FILES.items():
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("argv", "env", "problem", "fix", "state"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_input(request, scenario_files, argv, env, problem, fix, state):
    if state == LAB:
        request.getfixturevalue("lab").goto(0)
    elif state == NO_LAB:
        lab_module.down()
    argv = [arg.replace("{tmp}", str(scenario_files)) for arg in argv]
    assert_one_line_error(run(nstrace_argv(*argv), env), problem, fix)


def test_there_are_at_least_twenty_cases():
    assert len({case[0] for case in CASES}) == len(CASES) >= 20


@pytest.mark.parametrize(
    "argv",
    [["ping", "RED", "11.11.11.3"], ["watch", "--host", "192.0.2.1"]],
    ids=["ping", "watch"],
)
def test_not_root(lab, argv):
    # nobody, with only the right to read the files of the Python it runs
    # (which may live under /root): no CAP_BPF, no CAP_NET_ADMIN.
    lab.goto(0)
    unprivileged = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=+dac_read_search",
        "--ambient-caps=+dac_read_search",
    ]
    done = run([*unprivileged, sys.executable, "-m", "tracer.cli", *argv], {})
    assert_one_line_error(done, "needs root", "run it with sudo")
