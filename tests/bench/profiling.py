"""py-spy on a running paybus process, summarised as text: where the CPU samples go (self and total)."""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from pathlib import Path

from tests.bench.harness import cpu_seconds, ensure_py_spy

PROFILES = Path(__file__).resolve().parent / "profiles"
_LINE = re.compile(r":\d+\)$")


class Profile:
    """py-spy on ``pid`` (and its worker children) for ``seconds``, plus the CPU share it used meanwhile.

    py-spy samples only threads that are on the CPU, so a process that waits (on the broker, on the
    database) shows few samples: the CPU share says how busy it really was.
    """

    def __init__(self, pid: int, seconds: int, raw: Path) -> None:
        self.pid, self.seconds, self.raw = pid, seconds, raw
        self._cpu0, self._t0 = cpu_seconds(pid), time.monotonic()
        self._spy = start(pid, seconds, raw)

    def save(self, name: str, title: str) -> Path | None:
        self._spy.wait(timeout=self.seconds + 60)
        share = (cpu_seconds(self.pid) - self._cpu0) / (time.monotonic() - self._t0)
        if not self.raw.exists():
            return None
        return save(self.raw, name, f"{title}; the process used {share:.0%} of one core meanwhile")


def start(pid: int, seconds: int, raw: Path) -> subprocess.Popen[bytes]:
    """Sample ``pid`` (and its worker children) for ``seconds`` into a collapsed-stack file."""
    argv = [
        ensure_py_spy(),
        "record",
        "--pid",
        str(pid),
        "--subprocesses",
        "--duration",
        str(seconds),
        "--rate",
        "100",
        "--format",
        "raw",
        "--output",
        str(raw),
    ]
    with raw.with_suffix(".log").open("wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def _frame(frame: str) -> str:
    """`handler (ingress/webhook.py:42)` -> `handler (ingress/webhook.py)`; paths cut below site-packages."""
    frame = _LINE.sub(")", frame.strip())
    for marker in ("site-packages/", "/lib/python3"):
        if marker in frame:
            name, _, path = frame.partition(" (")
            path = (
                path.split(marker, 1)[1]
                if marker == "site-packages/"
                else "stdlib/" + path.rsplit("/", 1)[-1]
            )
            frame = f"{name} ({path}"
    return frame


def summarise(raw: Path, title: str, top: int = 30) -> str:
    """Top functions by self samples and by total (inclusive) samples, with shares of all samples."""
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            total_counts[frame] += count
    out = [f"# {title}", f"# {samples} on-CPU samples at 100 Hz (waits are not sampled)", ""]
    out.append("## self (where the CPU is spent)")
    for frame, count in self_counts.most_common(top):
        out.append(f"{100 * count / max(samples, 1):6.1f}%  {frame}")
    out.append("")
    out.append("## total (the frame or anything it calls)")
    for frame, count in total_counts.most_common(top):
        out.append(f"{100 * count / max(samples, 1):6.1f}%  {frame}")
    return "\n".join(out) + "\n"


def save(raw: Path, name: str, title: str) -> Path:
    PROFILES.mkdir(exist_ok=True)
    path = PROFILES / f"{name}.txt"
    path.write_text(summarise(raw, title))
    return path
