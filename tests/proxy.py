"""A TCP proxy a test can cut: the broker "goes down" for one client without touching the shared broker."""

from __future__ import annotations

import asyncio
import contextlib
import ssl


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, tls: ssl.SSLContext | None = None) -> None:
        self.target = (target_host, target_port)
        self._tls = tls  # terminate TLS here: clients speak TLS to the proxy, plain TCP goes on
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._up = True
        self._frozen = False

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, ssl=self._tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._up:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self._frozen:
                    continue  # swallowed, as by a network that silently stopped delivering
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    def cut(self) -> None:
        """Drop every connection and refuse new ones, as a dead broker would."""
        self._up = False
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self._up = True

    def freeze(self) -> None:
        """Keep every connection open but deliver nothing either way: a silent, not a dead, broker."""
        self._frozen = True

    def thaw(self) -> None:
        self._frozen = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
