"""The one family of errors that nstrace reports to its users.

Every expected failure (bad input, an environment that cannot trace, a lab
that is not up) is raised as a :class:`NstraceError` whose message is one
sentence naming the problem and what to do. The command line prints it on one
line and exits with code 2; lower-level errors (netlink, libbpf return codes,
scapy) are translated into this family where they enter nstrace.
"""

from __future__ import annotations


class NstraceError(Exception):
    """An expected failure: printed as one line, exit code 2."""

    exit_code = 2


class UsageError(NstraceError):
    """The command line or a scenario file asked for something impossible."""


class CannotTraceError(NstraceError):
    """This machine cannot trace: missing privilege, BTF, tool or object."""


class LabError(NstraceError):
    """The sandbox lab is missing, half-built, or refused a step."""
