"""The `nstrace` command line: parse, dispatch, print, and exit with a code.

Results go to stdout, diagnostics to stderr. Exit codes (DESIGN.md): 0 the
probe made the round trip (or all checks held), 1 it did not, 2 bad input or
an environment that cannot trace, printed as one line without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

from tracer.errors import NstraceError

log = logging.getLogger("tracer")

EPILOG_PING = """\
examples:
  nstrace ping RED 11.11.11.3       trace RED's ping to BLUE across br0
  nstrace ping RED 8.8.8.8 --json   the same as a JSON document (schema 1)
  nstrace ping host BLUE            a namespace name stands for its address
  nstrace ping RED 8.8.8.8 --proto tcp --port 80   a TCP SYN instead of an echo
  nstrace ping RED 8.8.8.8 --svg path.svg   draw the path on the lab's topology

exit codes: 0 reply, 1 no reply (dropped, unreachable, lost), 2 bad input
"""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds"
        ) from None
    if not value > 0 or value > 3600:
        raise argparse.ArgumentTypeError(
            f"{text} is out of range; give seconds between 0 and 3600, e.g. 1.5"
        )
    return value


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line: the problem and where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a port; give a number from 1 to 65535"
        )
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="nstrace",
        description="Follow a probe packet through network namespaces, bridges, "
        "routing and netfilter, and say where and why it stopped.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="diagnostics on stderr (-vv for libbpf's own)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    ping = commands.add_parser(
        "ping",
        help="send one tagged probe and trace it and its reply",
        description="Send one ICMP echo from SRC to DST and show every device, "
        "hook, route lookup and NAT rewrite it and its reply went through.",
        epilog=EPILOG_PING,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ping.add_argument(
        "src",
        metavar="SRC",
        help="namespace to send from: a name from `ip netns list`, "
        "or `host` for the lab's host",
    )
    ping.add_argument("dst", metavar="DST", help="IPv4 address, or a namespace name")
    ping.add_argument(
        "--proto",
        default="icmp",
        help="probe protocol: icmp (echo, default), tcp (SYN) or udp",
    )
    ping.add_argument(
        "--port",
        type=int,
        default=None,
        metavar="N",
        help="destination port of a tcp or udp probe",
    )
    ping.add_argument(
        "--timeout",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="seconds to wait for a reply (default 1)",
    )
    ping.add_argument("--json", action="store_true", help="print JSON (schema 1)")
    ping.add_argument(
        "--record",
        metavar="FILE",
        help="also save the raw events as a recording that nstrace's tests "
        "can replay (for bug reports)",
    )
    ping.add_argument(
        "--all",
        action="store_true",
        help="show every hop, also ARP's and routine route look-ups",
    )
    ping.add_argument(
        "--svg",
        metavar="FILE",
        help="also draw the topology with the path on it, as SVG (needs Graphviz)",
    )
    ping.add_argument("--png", metavar="FILE", help="the same picture as PNG")
    ping.add_argument(
        "--host-ns",
        default="host",
        metavar="NS",
        help="the namespace that plays the tutorial's host: `host` in "
        "the sandbox (default), `root` on a real VM",
    )

    lab = commands.add_parser("lab", help="build, move or remove the sandbox lab")
    lab_commands = lab.add_subparsers(
        dest="lab_command", metavar="ACTION", required=True
    )
    up = lab_commands.add_parser("up", help="build the lab, at a step of its scenario")
    up.add_argument(
        "scenario",
        nargs="?",
        default="tutorial",
        help="scenario name in scenarios/ or a YAML file (default tutorial)",
    )
    up.add_argument(
        "--step",
        type=int,
        default=None,
        metavar="N",
        help="apply steps 1..N (default: the starting point)",
    )
    run = lab_commands.add_parser(
        "run",
        help="walk every step: trace its probes, show what changed",
        description="Build the scenario's lab afresh and, step by step, apply the "
        "step, trace its probes and show what changed since the same probe's last "
        "trace: outcome, hooks crossed, drop point, NAT, causes. The lab comes "
        "down at the end unless --keep. Exit codes: 0 every expectation held, "
        "1 one did not, 2 bad input.",
    )
    run.add_argument(
        "scenario",
        metavar="SCENARIO",
        help="scenario name in scenarios/ or a YAML file",
    )
    run.add_argument(
        "--timeout",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="seconds to wait for each reply (default 1)",
    )
    run.add_argument(
        "--json",
        action="store_true",
        help="print every step's traces and changes as JSON",
    )
    run.add_argument(
        "--keep", action="store_true", help="leave the lab up at the last step"
    )
    run.add_argument(
        "--report",
        metavar="DIR",
        help="also write DIR/index.html: every step's commands, pictures before "
        "and after, changes and explanation (offline, no network assets)",
    )
    lab_commands.add_parser("down", help="remove everything the lab made")
    status = lab_commands.add_parser(
        "status", help="show the lab's namespaces and step"
    )
    status.add_argument("--json", action="store_true", help="print JSON")

    check = commands.add_parser(
        "check",
        help="run every expectation of a scenario; exit 0 if all hold",
        description="Build the scenario's lab, trace every step's probes, judge "
        "their expectations, print a table with the evidence of each failure and "
        "tear the lab down. Exit codes: 0 all held, 1 one did not, 2 bad input.",
    )
    check.add_argument(
        "scenario",
        metavar="SCENARIO",
        help="scenario name in scenarios/ or a YAML file",
    )
    check.add_argument("--junit", metavar="FILE", help="also write JUnit XML to FILE")
    check.add_argument(
        "--timeout",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="seconds to wait for each reply (default 1)",
    )
    diff = commands.add_parser(
        "diff",
        help="what changed between two saved traces",
        description="Compare two results of `nstrace ping --json` for the same "
        "probe: outcome, hooks crossed, drop point, NAT, causes. Exit codes: "
        "0 nothing changed, 1 something did, 2 a file is not a trace.",
    )
    diff.add_argument("before", metavar="BEFORE.json")
    diff.add_argument("after", metavar="AFTER.json")
    diff.add_argument("--json", action="store_true", help="print the changes as JSON")

    commands.add_parser("doctor", help="check that this machine can trace")
    demo = commands.add_parser("demo", help="build the lab and trace the tutorial")
    demo.add_argument("--keep", action="store_true", help="leave the lab up afterwards")

    watch = commands.add_parser(
        "watch",
        help="live trace of matching packets until Ctrl-C",
        description="Show every hop of every packet that matches the filters, "
        "grouped by packet, until Ctrl-C. Filters left out match anything. "
        "Netfilter hooks cost every packet that crosses them, so a namespace's "
        "hooks are traced from the first matching packet seen there on; with "
        "--netns, from the start.",
    )
    watch.add_argument(
        "--netns",
        metavar="N",
        help="only devices in this namespace (`host` for the lab's)",
    )
    watch.add_argument(
        "--host", metavar="ADDR", help="only packets from or to this IPv4 address"
    )
    watch.add_argument("--proto", help="only this protocol: icmp, tcp or udp")
    watch.add_argument(
        "--port",
        type=_port,
        metavar="N",
        help="only TCP or UDP packets from or to this port",
    )
    watch.add_argument("--json", action="store_true", help="one JSON object per line")
    watch.add_argument(
        "--duration",
        type=_positive_float,
        metavar="S",
        help="stop after S seconds instead of at Ctrl-C",
    )
    return parser


def _terminated(_signum: int, _frame: object) -> None:
    # SIGTERM ends nstrace the way Ctrl-C does, through every `finally` that
    # detaches probes and closes sockets. (kill -9 skips them; then the
    # kernel releases links, programs and owner tables with the last fd.)
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminated)
    # A shell starts background jobs with SIGINT ignored, and Python then
    # leaves it ignored: Ctrl-C (or kill -INT) must still end nstrace cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="nstrace: %(levelname)s: %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _dispatch(args)
    except NstraceError as exc:
        print(f"nstrace: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("nstrace: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "ping":
        return cmd_ping(args)
    if args.command == "lab":
        from tracer import commands

        return commands.lab(args)
    if args.command == "check":
        from tracer import commands

        return commands.check_scenario(args)
    if args.command == "diff":
        from tracer import commands

        return commands.diff_results(args)
    if args.command == "doctor":
        from tracer import doctor

        return doctor.main()
    if args.command == "demo":
        from tracer import commands

        return commands.demo(args)
    if args.command == "watch":
        from tracer import watch

        return watch.main(args)
    raise AssertionError(args.command)


def cmd_ping(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    from tracer import inject

    # On a thread, scapy, then the renderer and, for text only, rich: they
    # overlap loading the probes and every other wait for the kernel.
    rich = () if args.json else ("rich.console", "rich.tree")
    inject.preload_scapy(then=("tracer.render", *rich))
    from tracer import trace

    imported = time.perf_counter()
    request = trace.parse_request(
        args.src, args.dst, args.proto, args.timeout, args.host_ns, args.port
    )
    request.record = args.record
    request.timings["imports_ms"] = (imported - started) * 1000
    result = trace.ping(request)
    rendering = time.perf_counter()
    from tracer import render

    if args.json:
        print(render.render_json(result))
    else:
        render.render_text(result, render.console(), full=args.all)
    if args.svg or args.png:
        from tracer import picture

        picture.save(result, svg=args.svg, png=args.png)
    request.timings["render_ms"] = (time.perf_counter() - rendering) * 1000
    _write_timings(request.timings)
    return result.exit_code()


def _write_timings(timings: dict[str, float]) -> None:
    """Stage times for `make bench`, to the file named by NSTRACE_TIMINGS."""
    path = os.environ.get("NSTRACE_TIMINGS")
    if path:
        with open(path, "w") as fh:
            json.dump(timings, fh)


def run() -> NoReturn:
    """The `nstrace` command: main(), then exit without finalising Python.

    Tearing the interpreter down once scapy and rich are loaded took 60 to
    130 ms, a tenth of `nstrace ping` (`make bench`). By then everything that
    matters is released: probes are closed in `finally` blocks and owner
    nftables tables go with the process. Output is flushed first.
    """
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # `nstrace ... | head`: the reader has gone
        pass
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
