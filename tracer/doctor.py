"""`nstrace doctor`: can this machine trace, and what is missing if not.

Each check is tried for real (load a program, attach it, create a link in a
throwaway namespace), never inferred from the kernel version: kernels of the
same version differ in what they allow (DESIGN.md, "What the kernel
offers"). Every line that fails says what to do. Exit 0 when nstrace can
trace: root, BTF, the BPF object, tp_btf programs and netfilter links.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass

from tracer import bpf, btf, probes
from tracer.errors import NstraceError

REQUIRED_TOOLS = ("ip", "iptables", "nft")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def run_checks() -> list[Check]:
    checks = [
        Check("kernel", True, platform.release(), required=False),
        _root(),
        _btf(),
        _object(),
    ]
    if all(check.ok for check in checks):
        checks += _programs()
        checks.append(_rule_attribution())
    checks += [_tool(name) for name in REQUIRED_TOOLS]
    return checks


def _root() -> Check:
    ok = os.geteuid() == 0
    return Check(
        "privileges",
        ok,
        "root" if ok else f"euid {os.geteuid()}",
        "run nstrace as root (sudo): BPF and namespaces need it",
    )


def _btf() -> Check:
    try:
        return Check("BTF", True, btf.check_btf())
    except NstraceError as exc:
        return Check(
            "BTF", False, str(exc), "use a kernel with CONFIG_DEBUG_INFO_BTF=y"
        )


def _object() -> Check:
    path = probes.default_object_path()
    ok = os.path.exists(path)
    return Check("BPF object", ok, path, "build it with `make probes`")


def _programs() -> list[Check]:
    """Load the object and try every attach type nstrace may use."""
    try:
        engine = probes.Probes()
    except NstraceError as exc:
        return [
            Check("load", False, str(exc), "see the message; `make probes` rebuilds")
        ]
    try:
        checks = [Check("load", True, f"{engine.timings['load_attach_ms']:.1f} ms")]
        for name in probes.TRACEPOINTS:
            section = engine.obj.programs[name].section
            failed = engine.unavailable.get(name)
            checks.append(
                Check(
                    section,
                    not failed,
                    failed or "attached",
                    "this observation point is skipped",
                    required=False,
                )
            )
        checks.append(_netfilter_link(engine))
    finally:
        engine.close()
    checks += [_feature(name) for name in probes.FEATURES]
    return checks


def _netfilter_link(engine: probes.Probes) -> Check:
    name = f"nstrace-doctor-{os.getpid()}"
    fix = "netfilter hooks need kernel 6.4+ with CONFIG_NETFILTER_BPF_LINK"
    if "on_hook_first" in engine.unavailable:
        return Check("netfilter link", False, engine.unavailable["on_hook_first"], fix)
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        engine.link_netfilter([name])
        return Check("netfilter link", True, "linked at 5 hooks x 2 priorities")
    except NstraceError as exc:
        return Check("netfilter link", False, str(exc), fix)
    finally:
        engine.close()
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def _rule_attribution() -> Check:
    """nstrace's owner-flagged nftables tables and a trace listener, for real."""
    from tracer import rules

    name = f"nstrace-doctor-rules-{os.getpid()}"
    fix = "optional: without libnftables1 and nf_tables, hops have no rule names"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        with rules.RuleTracer([name], rules.Flow("icmp", 1)):
            listed = subprocess.run(
                ["ip", "netns", "exec", name, "nft", "list", "tables"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
        if "nstrace_" not in listed:
            return Check(
                "rule attribution",
                False,
                "nstrace's table did not appear",
                fix,
                required=False,
            )
        return Check(
            "rule attribution",
            True,
            "nftables trace table and listener",
            required=False,
        )
    except (NstraceError, OSError) as exc:
        return Check("rule attribution", False, str(exc), fix, required=False)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def _feature(name: str) -> Check:
    """Load one feature program alone, attach it, and let it go."""
    label = name.removeprefix("feature_")
    obj = bpf.BpfObject(probes.default_object_path())
    try:
        for other in obj.programs:
            obj.set_autoload(other, other == name)
        with bpf.quiet():
            obj.load()
            obj.attach(name)
        return Check(label, True, "available", required=False)
    except NstraceError as exc:
        return Check(
            label, False, str(exc), "optional: nstrace works without it", required=False
        )
    finally:
        obj.close()


def _tool(name: str) -> Check:
    path = shutil.which(name)
    return Check(
        name,
        bool(path),
        path or "not found",
        "install it (`make deps`, or apt-get install iproute2 iptables nftables)",
    )


def main() -> int:
    checks = run_checks()
    width = max(len(check.name) for check in checks)
    for check in checks:
        mark = "ok  " if check.ok else ("FAIL" if check.required else "no  ")
        line = f"{mark} {check.name:<{width}}  {check.detail}"
        if not check.ok and check.fix:
            line += f"  -> {check.fix}"
        print(line)
    can_trace = all(check.ok for check in checks if check.required)
    print("nstrace can trace here" if can_trace else "nstrace cannot trace here yet")
    return 0 if can_trace else 2
