"""`make bench`: nstrace's figures against the alternatives, in one run.

Everything happens inside the sandbox lab, in namespaces of the bench's own
(the script re-runs itself under scripts/isolated), and every measurement is
bounded in time and in count. The figures are printed as a table and written
to bench/results.json; nothing here is asserted, anywhere.

- time to verdict: whole-command wall time of `nstrace ping RED 8.8.8.8` at
  the tutorial's step 6 (the reply is dropped) and step 7 (a reply), against
  `ping -c1 -W1` over the same path, started inside RED (setns in the child,
  no `ip netns exec` in between); medians over repeated runs and ratios.
- start-up: probe load and attach, alone and inside `nstrace ping`, and the
  time of each stage of `nstrace ping` (NSTRACE_TIMINGS).
- overhead: iperf3 RED -> BLUE through br0, TCP and UDP with 64-byte
  payloads, without tracing and with `nstrace watch` on a filter that matches
  nothing, and again with the host's hooks linked from the start (--netns
  host); medians of interleaved runs, as throughput ratios.
- capacity: `nstrace watch` on a filter that matches an iperf3 UDP flood at
  rising packet rates; matching events per second carried before any loss,
  and the loss the watch reported past that.
- memory: peak RSS of `nstrace ping` (wait4's rusage of the child).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracer import lab as lab_module
from tracer import netns
from tracer.scenario import default_scenario

RESULTS = ROOT / "bench" / "results.json"
ISOLATED_FLAG = "NSTRACE_BENCH_ISOLATED"
RUNS = int(os.environ.get("NSTRACE_BENCH_RUNS", "7"))
IPERF_SECONDS = 2
OVERHEAD_SECONDS = 3  # each overhead run; a warm-up run of each kind comes first
IPERF_PORT = 5299  # not iperf3's default, so that other labs' floods do not match
NOTHING = "192.0.2.1"  # TEST-NET-1 (RFC 5737): no packet of the lab has it
BLUE = "11.11.11.3"
INTERNET = "8.8.8.8"
# Capacity: UDP packets per second offered, rising until the watch loses some.
FLOOD_RATES = (2_000, 5_000, 10_000, 20_000, 30_000, 45_000, 60_000, 80_000)
OVERHEAD_ROUNDS = 7  # interleaved rounds of runs: other load on the machine drifts
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def nstrace_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tracer.cli", *args]


def in_netns(ns: str) -> Callable[[], None]:
    """A preexec_fn that moves the child into lab namespace *ns* before exec."""
    path = netns.path_of(ns)

    def enter() -> None:
        fd = os.open(path, os.O_RDONLY)
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
        os.close(fd)

    return enter


def timed_run(
    argv: Sequence[str], ns: str | None = None, env: dict[str, str] | None = None
) -> tuple[float, int, float]:
    """Run *argv* to the end: wall seconds, exit code, peak RSS of the child (MB)."""
    started = time.perf_counter()
    child = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=in_netns(ns) if ns else None,  # noqa: PLW1509 (no threads here)
        env=env,
        cwd=ROOT,
    )
    _pid, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    return elapsed, child.returncode, usage.ru_maxrss / 1024


def verdict_times(step: int, figures: dict[str, Any], stages: list[dict]) -> None:
    """nstrace ping against ping -c1 -W1 at *step*, interleaved, RUNS times each."""
    lab_module.goto(default_scenario(), step)
    name = "drop" if step == 6 else "reply"
    ours, theirs, codes = [], [], set()
    with tempfile.TemporaryDirectory() as tmp:
        timings = os.path.join(tmp, "timings.json")
        env = dict(os.environ, NSTRACE_TIMINGS=timings)
        timed_run(nstrace_argv("ping", "RED", INTERNET), env=env)  # warm the caches
        for _ in range(RUNS):
            wall, code, rss = timed_run(nstrace_argv("ping", "RED", INTERNET), env=env)
            ours.append(wall)
            codes.add(code)
            figures["peak_rss_mb"] = max(figures.get("peak_rss_mb", 0.0), rss)
            with open(timings) as fh:
                stages.append(json.load(fh))
            wall, _code, _rss = timed_run(
                ["ping", "-n", "-c1", "-W1", INTERNET], ns="RED"
            )
            theirs.append(wall)
    figures[f"verdict_{name}_s"] = statistics.median(ours)
    figures[f"ping_w1_{name}_s"] = statistics.median(theirs)
    figures[f"verdict_{name}_ratio"] = statistics.median(ours) / statistics.median(
        theirs
    )
    figures[f"verdict_{name}_exit_codes"] = sorted(codes)


def attach_alone(figures: dict[str, Any]) -> None:
    """Probe load and attach in this process, nothing else running: median ms."""
    from tracer.probes import Probes

    times = []
    for _ in range(RUNS):
        with Probes() as probes:
            times.append(probes.timings["load_attach_ms"])
    figures["attach_ms"] = statistics.median(times)


class Watch:
    """`nstrace watch` in the background, started and stopped cleanly."""

    def __init__(self, *filters: str) -> None:
        self.out = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in stop)
        self.child = subprocess.Popen(
            nstrace_argv("watch", "--json", *filters),
            stdout=self.out,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        line = self.child.stderr.readline()  # "watching ...": probes attached
        if not line.startswith("watching"):
            self.child.kill()
            raise RuntimeError(f"nstrace watch did not start: {line.strip()}")

    def stop(self) -> dict[str, Any]:
        """SIGINT, then the watch's own summary line."""
        self.child.send_signal(signal.SIGINT)
        try:
            self.child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()
        self.out.seek(0)
        last: dict[str, Any] = {}
        for line in self.out:
            if line.startswith('{"summary"'):
                last = json.loads(line)
        self.out.close()
        self.child.stderr.close()
        return last


class Iperf:
    """An iperf3 server in BLUE, and clients from RED, bounded in time."""

    def __init__(self) -> None:
        self.server = subprocess.Popen(
            ["iperf3", "-s", "-B", BLUE, "-p", str(IPERF_PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=in_netns("BLUE"),  # noqa: PLW1509
        )
        time.sleep(0.3)

    def run(self, *extra: str, seconds: int = IPERF_SECONDS) -> dict[str, Any]:
        argv = ["iperf3", "-c", BLUE, "-p", str(IPERF_PORT), "-J"]
        argv += ["-t", str(seconds), *extra]
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=seconds + 20,
            preexec_fn=in_netns("RED"),
            check=False,
        )
        report = json.loads(done.stdout or "{}")
        if "error" in report or done.returncode != 0:
            raise RuntimeError(f"iperf3 failed: {report.get('error', done.stderr)}")
        return report

    def close(self) -> None:
        self.server.terminate()
        self.server.wait(timeout=5)


def tcp_bps(report: dict[str, Any]) -> float:
    return report["end"]["sum_received"]["bits_per_second"]


def udp_pps(report: dict[str, Any]) -> float:
    """UDP datagrams per second that reached the server."""
    total = report["end"]["sum"]
    received = total["packets"] - total["lost_packets"]
    return received / total["seconds"]


# How the overhead is measured: no tracing; `nstrace watch` on a filter that
# matches nothing, as a user would leave it running (its hooks wait for the
# flow, tracer/watch.py Linker); and the same with --netns host, which links
# the host's hooks at once: the price of the hooks themselves, for bridged
# traffic that br_netfilter hands to them.
WATCHES: dict[str, tuple[str, ...] | None] = {
    "off": None,
    "on": ("--host", NOTHING),
    "linked": ("--netns", "host", "--host", NOTHING),
}


def overhead(iperf: Iperf, figures: dict[str, Any]) -> None:
    """Throughput without tracing and with a watch that matches nothing."""
    runs: dict[str, list[float]] = {
        f"{proto}_{key}": [] for proto in ("tcp", "udp") for key in WATCHES
    }
    # The first runs after the lab is built were the slowest, traced or not.
    iperf.run()
    iperf.run("-u", "-l", "64", "-b", "0")
    for _ in range(OVERHEAD_ROUNDS):
        for key, filters in WATCHES.items():
            watch = Watch(*filters) if filters else None
            try:
                runs[f"tcp_{key}"].append(tcp_bps(iperf.run(seconds=OVERHEAD_SECONDS)))
                udp = iperf.run("-u", "-l", "64", "-b", "0", seconds=OVERHEAD_SECONDS)
                runs[f"udp_{key}"].append(udp_pps(udp))
            finally:
                if watch:
                    watch.stop()
    medians = {key: statistics.median(values) for key, values in runs.items()}
    figures["tcp_gbps_off"] = medians["tcp_off"] / 1e9
    figures["tcp_gbps_on"] = medians["tcp_on"] / 1e9
    figures["udp64_pps_off"] = medians["udp_off"]
    figures["udp64_pps_on"] = medians["udp_on"]
    # Each ratio is the median of the rounds' own ratios: a run is compared
    # with the untraced run just before it, so that load which comes and goes
    # on the machine (a slow drift, a busy minute) cancels out.
    for proto in ("tcp", "udp"):
        for key, name in (("on", ""), ("linked", "_linked")):
            figures[f"overhead_{proto}{name}_ratio"] = statistics.median(
                traced / untraced
                for traced, untraced in zip(
                    runs[f"{proto}_{key}"], runs[f"{proto}_off"], strict=True
                )
            )
    # The spread says how far to trust a ratio: other work on the machine.
    figures["overhead_runs"] = runs


def capacity(iperf: Iperf, figures: dict[str, Any]) -> None:
    """Matching events per second carried before the first loss."""
    levels = []
    for rate in FLOOD_RATES:
        watch = Watch("--proto", "udp", "--port", str(IPERF_PORT))
        started = time.monotonic()
        try:
            bandwidth = rate * 64 * 8
            iperf.run("-u", "-l", "64", "-b", str(bandwidth))
        finally:
            seconds = time.monotonic() - started
            summary = watch.stop()
        events, lost = summary.get("events", 0), summary.get("lost_events", 0)
        levels.append(
            {
                "packets_per_s": rate,
                "events_per_s": (events + lost) / seconds,
                "carried_per_s": events / seconds,
                "lost": lost,
            }
        )
        if lost:
            break
    clean = [level["events_per_s"] for level in levels if not level["lost"]]
    figures["capacity_events_per_s"] = max(clean) if clean else 0.0
    figures["capacity_levels"] = levels
    lossy = [level for level in levels if level["lost"]]
    figures["capacity_first_loss"] = lossy[0] if lossy else None


def stage_medians(stages: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({key for run in stages for key in run})
    return {
        key.removesuffix("_ms"): statistics.median(
            run[key] for run in stages if key in run
        )
        for key in keys
    }


def table(figures: dict[str, Any]) -> str:
    rows = [
        ("drop reported (step 6), nstrace ping", f"{figures['verdict_drop_s']:.3f} s"),
        ("  ping -c1 -W1, same path", f"{figures['ping_w1_drop_s']:.3f} s"),
        ("  ratio (goal < 0.5)", f"{figures['verdict_drop_ratio']:.2f}"),
        ("reply (step 7), nstrace ping", f"{figures['verdict_reply_s']:.3f} s"),
        ("  ping -c1 -W1, same path", f"{figures['ping_w1_reply_s']:.3f} s"),
        ("  ratio", f"{figures['verdict_reply_ratio']:.2f}"),
        ("probes loaded and attached (goal < 50 ms)", f"{figures['attach_ms']:.1f} ms"),
        ("  the same inside nstrace ping", f"{figures['stages_ms']['attach']:.1f} ms"),
    ]
    for stage, ms in figures["stages_ms"].items():
        rows.append((f"  stage {stage}", f"{ms:.1f} ms"))
    rows += [
        (
            "iperf3 TCP, off / watch on",
            f"{figures['tcp_gbps_off']:.2f} / {figures['tcp_gbps_on']:.2f} Gbit/s",
        ),
        ("  ratio (goal >= 0.97)", f"{figures['overhead_tcp_ratio']:.3f}"),
        (
            "iperf3 UDP 64 B, off / watch on",
            f"{figures['udp64_pps_off']:.0f} / {figures['udp64_pps_on']:.0f} pkt/s",
        ),
        ("  ratio (goal >= 0.90)", f"{figures['overhead_udp_ratio']:.3f}"),
        (
            "  ratios with the host's hooks linked (watch --netns host), TCP / UDP",
            "{:.3f} / {:.3f}".format(
                figures["overhead_tcp_linked_ratio"],
                figures["overhead_udp_linked_ratio"],
            ),
        ),
        (
            "capacity, matching events/s without loss",
            f"{figures['capacity_events_per_s']:.0f}",
        ),
    ]
    loss = figures.get("capacity_first_loss")
    if loss:
        rows.append(
            (
                "  first loss",
                f"{loss['lost']} lost at {loss['events_per_s']:.0f} events/s",
            )
        )
    else:
        rows.append(("  first loss", "none, up to the highest flood offered"))
    rows.append(("peak RSS of nstrace ping", f"{figures['peak_rss_mb']:.1f} MB"))
    before, after = figures["load_average_before"], figures["load_average_after"]
    rows.append(
        (
            "load average (1 min), before / after",
            f"{before:.2f} / {after:.2f} on {figures['cpus']} CPUs",
        )
    )
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def bench() -> dict[str, Any]:
    figures: dict[str, Any] = {
        "runs": RUNS,
        "cpus": os.cpu_count(),
        # Other work on the machine shows in every figure: say how much.
        "load_average_before": os.getloadavg()[0],
    }
    stages: list[dict[str, float]] = []
    try:
        verdict_times(6, figures, stages)
        verdict_times(7, figures, stages)
        figures["ping_w1_s"] = figures["ping_w1_drop_s"]
        figures["stages_ms"] = stage_medians(stages)
        attach_alone(figures)
        iperf = Iperf()
        try:
            overhead(iperf, figures)
            capacity(iperf, figures)
        finally:
            iperf.close()
    finally:
        lab_module.down()
    figures["load_average_after"] = os.getloadavg()[0]
    return figures


def main() -> int:
    if os.geteuid() != 0:
        print("bench: needs root (BPF and namespaces); run `sudo make bench`")
        return 2
    if os.environ.get(ISOLATED_FLAG) != "1":
        # Private /run/netns: the bench's lab cannot collide with another.
        env = dict(os.environ, **{ISOLATED_FLAG: "1"})
        argv = [str(ROOT / "scripts" / "isolated"), sys.executable, __file__]
        os.execve(argv[0], [*argv, *sys.argv[1:]], env)
    figures = bench()
    print(table(figures))
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
