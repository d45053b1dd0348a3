"""`make run` (`paybus dev`) brings the system up; a sample event lands; Ctrl-C stops it cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from shared import db
from tests.conftest import env_for
from tests.support import database_url, unique, wait_for, wait_for_sync


async def test_dev_mode_migrates_prints_the_url_and_applies_a_sent_event(
    make_vhost: Callable[[], str], tmp_path: Path
) -> None:
    url = database_url(unique("paybus_dev"))  # a database that does not exist yet: dev mode creates it
    env = env_for(url, make_vhost())
    paybus = str(Path(sys.executable).parent / "paybus")
    log = (tmp_path / "dev.log").open("w+")
    proc = subprocess.Popen([paybus, "dev"], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_sync(lambda: "webhook URL:" in Path(log.name).read_text(), timeout=30)
        output = Path(log.name).read_text()
        assert f"http://127.0.0.1:{env['INGRESS_PORT']}/webhook/stripe" in output

        user = "7d3f7c8e-4444-4a5b-9c9d-000000000004"

        def sent() -> bool:
            result = subprocess.run(
                [paybus, "send-event", "payment_intent.succeeded", "--user", user],
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            return result.returncode == 0

        wait_for_sync(sent, timeout=30, interval=0.3)
        async with await psycopg.AsyncConnection.connect(url) as conn:

            async def landed() -> Any:
                row = await (
                    await conn.execute("SELECT status FROM payments WHERE user_id = %s", (user,))
                ).fetchone()
                return row[0] if row else None

            assert await wait_for(landed, timeout=30) == "succeeded"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in Path(log.name).read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        db.drop_database(url)
