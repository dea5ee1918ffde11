"""The `nstrace` command line: parse, dispatch, print, and exit with a code.

Results go to stdout, diagnostics to stderr. Exit codes (DESIGN.md): 0 the
probe made the round trip (or all checks held), 1 it did not, 2 bad input or
an environment that cannot trace, printed as one line without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tracer.errors import NstraceError

log = logging.getLogger("tracer")

EPILOG_PING = """\
examples:
  nstrace ping RED 11.11.11.3       trace RED's ping to BLUE across br0
  nstrace ping RED 8.8.8.8 --json   the same as a JSON document (schema 1)
  nstrace ping host BLUE            a namespace name stands for its address
  nstrace ping RED 8.8.8.8 --proto tcp --port 80   a TCP SYN instead of an echo

exit codes: 0 reply, 1 no reply (dropped, unreachable, lost), 2 bad input
"""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value > 3600:
        raise argparse.ArgumentTypeError(
            f"{text} is out of range; give seconds between 0 and 3600, e.g. 1.5"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nstrace",
        description="Follow a probe packet through network namespaces, bridges, "
        "routing and netfilter, and say where and why it stopped.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="diagnostics on stderr (-vv for libbpf's own)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    ping = commands.add_parser(
        "ping", help="send one tagged probe and trace it and its reply",
        description="Send one ICMP echo from SRC to DST and show every device, "
        "hook, route lookup and NAT rewrite it and its reply went through.",
        epilog=EPILOG_PING, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ping.add_argument("src", metavar="SRC",
                      help="namespace to send from: a name from `ip netns list`, "
                      "or `host` for the lab's host")
    ping.add_argument("dst", metavar="DST", help="IPv4 address, or a namespace name")
    ping.add_argument("--proto", default="icmp",
                      help="probe protocol: icmp (echo, default), tcp (SYN) or udp")
    ping.add_argument("--port", type=int, default=None, metavar="N",
                      help="destination port of a tcp or udp probe")
    ping.add_argument("--timeout", type=_positive_float, default=1.0, metavar="S",
                      help="seconds to wait for a reply (default 1)")
    ping.add_argument("--json", action="store_true", help="print JSON (schema 1)")
    ping.add_argument("--host-ns", default="host", metavar="NS",
                      help="the namespace that plays the tutorial's host: `host` in "
                      "the sandbox (default), `root` on a real VM")

    lab = commands.add_parser("lab", help="build, move or remove the sandbox lab")
    lab_commands = lab.add_subparsers(dest="lab_command", metavar="ACTION", required=True)
    up = lab_commands.add_parser("up", help="build the lab, at a step of its scenario")
    up.add_argument("scenario", nargs="?", default="tutorial",
                    help="scenario name in scenarios/ or a YAML file (default tutorial)")
    up.add_argument("--step", type=int, default=None, metavar="N",
                    help="apply steps 1..N (default: the starting point)")
    lab_commands.add_parser("down", help="remove everything the lab made")
    status = lab_commands.add_parser("status", help="show the lab's namespaces and step")
    status.add_argument("--json", action="store_true", help="print JSON")

    commands.add_parser("doctor", help="check that this machine can trace")
    demo = commands.add_parser("demo", help="build the lab and trace the tutorial")
    demo.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
    if args.command == "doctor":
        from tracer import doctor

        return doctor.main()
    if args.command == "demo":
        from tracer import commands

        return commands.demo(args)
    raise AssertionError(args.command)


def cmd_ping(args: argparse.Namespace) -> int:
    from tracer import render, trace

    request = trace.parse_request(args.src, args.dst, args.proto, args.timeout,
                                  args.host_ns, args.port)
    result = trace.ping(request)
    if args.json:
        print(render.render_json(result))
    else:
        render.render_text(result, render.console())
    return result.exit_code()


if __name__ == "__main__":
    sys.exit(main())
