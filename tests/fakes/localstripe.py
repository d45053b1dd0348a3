"""localstripe (GPL: a separate process, never imported) started for the tests, and its webhook config."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support import free_port, wait_for_sync


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def running_localstripe(log_path: Path) -> Iterator[str]:
    """`localstripe --port P --from-scratch` until the block ends; yields its base URL."""
    port = free_port()
    executable = Path(sys.executable).parent / "localstripe"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [str(executable), "--port", str(port), "--from-scratch"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=log_path.parent,
        )
        try:
            wait_for_sync(lambda: proc.poll() is not None or _listening(port), timeout=20)
            if proc.poll() is not None:
                raise AssertionError(f"localstripe exited: {log_path.read_text()[-2000:]}")
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def register_webhook(base_url: str, url: str, secret: str, name: str = "paybus") -> None:
    """localstripe then POSTs every event it emits, signed with ``secret``, to ``url``."""
    data = urllib.parse.urlencode({"url": url, "secret": secret}).encode()
    request = urllib.request.Request(f"{base_url}/_config/webhooks/{name}", data=data, method="POST")  # noqa: S310
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        assert response.status == 200
