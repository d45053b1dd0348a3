"""`shared.heap.settle`: start-up objects frozen out of the collector's walks, young collections rarer."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import REPO

_PROBE = """
import gc, json
import ingress.app, processor.service  # what a service has loaded by the time it settles
from shared import heap
before = gc.get_freeze_count(), gc.get_threshold()
heap.settle()
print(json.dumps({"before": before, "frozen": gc.get_freeze_count(), "threshold": gc.get_threshold(),
                  "tracked": len(gc.get_objects())}))
"""


def test_settle_freezes_what_start_up_allocated_and_raises_the_young_threshold() -> None:
    # In a process of its own: freezing and thresholds are process-wide and would outlive this test.
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout)
    assert seen["before"][0] == 0
    assert seen["frozen"] > 20_000  # the modules' functions, classes and constants
    assert seen["tracked"] < 1_000  # what a full collection still has to walk
    assert seen["threshold"][0] == 20_000 and seen["threshold"][1:] == seen["before"][1][1:]
