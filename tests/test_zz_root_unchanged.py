"""The run changed nothing in the namespace it ran in (DESIGN.md, "Sandbox").

tests/conftest.py snapshots the root namespace when the run starts and moves
this file to the end of the run; here the end is compared with the start.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from typing import Any

from tracer import lab, netns


def _lines(value: Any) -> list[str]:
    return json.dumps(value, indent=1, sort_keys=True).splitlines()


def test_root_namespace_unchanged(
    root_before: dict[str, Any], take_root_snapshot: Callable[[], dict[str, Any]]
) -> None:
    now = take_root_snapshot()
    changed = [part for part in root_before if root_before[part] != now[part]]
    diff = difflib.unified_diff(
        _lines({part: root_before[part] for part in changed}),
        _lines({part: now[part] for part in changed}),
        "root namespace at start",
        "root namespace now",
        lineterm="",
    )
    assert not changed, f"the tests changed {', '.join(changed)}:\n" + "\n".join(diff)


def test_no_stray_namespaces(namespaces_before: list[str]) -> None:
    # The session's lab may still stand (its fixture ends after this test);
    # anything else that appeared was left behind by a test.
    state = lab.current()
    owned = set(state.namespaces) if state else set()
    stray = sorted(set(netns.list_named()) - set(namespaces_before) - owned)
    assert not stray, f"namespaces left behind: {', '.join(stray)}"
