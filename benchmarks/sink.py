"""A fast SMTP sink on loopback that tells us when the last message arrived.

Preferred: Postfix's ``smtp-sink`` (C, event driven, discards mail) with ``-c``, which
prints ``sess=.. quit=.. mesg=N`` each time a message ends with ".". When it is not
installed, ``python -m benchmarks.sink 127.0.0.1:PORT`` runs an aiosmtpd sink that
prints the same counter, so :class:`CountingSink` reads either one the same way.

The counter is read by a thread that stamps each increase with ``time.perf_counter()``:
the benchmark's "last delivery" is the stamp of the increase that reached the target.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

_MESG = re.compile(rb"mesg=(\d+)")


class CountingSink:
    """Run a sink on 127.0.0.1:``port`` and follow its message counter."""

    def __init__(self, port: int, log_dir: Path) -> None:
        self.port = port
        self.count = 0
        self.last_at = time.perf_counter()
        self._cond = threading.Condition()
        if shutil.which("smtp-sink"):
            self.kind = "smtp-sink (Postfix)"
            cmd = ["smtp-sink", "-c", "-4", "-m", "1000", "-t", "100"]
            if os.geteuid() == 0:
                cmd += ["-u", "nobody"]  # smtp-sink refuses to keep root privileges
            cmd += [f"127.0.0.1:{port}", "1024"]
        else:
            self.kind = "aiosmtpd sink (python)"
            cmd = [sys.executable, "-m", "benchmarks.sink", f"127.0.0.1:{port}"]
        log_dir.mkdir(parents=True, exist_ok=True)
        self.command = cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log_dir / "sink.log", "wb"))
        self._reader = threading.Thread(target=self._read, name="sink-counter", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        tail = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            now = time.perf_counter()
            found = _MESG.findall(tail + chunk)
            tail = chunk[-40:]
            if found:
                n = int(found[-1])
                with self._cond:
                    if n > self.count:
                        self.count, self.last_at = n, now
                        self._cond.notify_all()

    def wait_for(self, target: int, deadline: float) -> tuple[int, float]:
        """Block until ``count >= target`` or ``perf_counter() >= deadline``; return (count, stamp of last increase)."""
        with self._cond:
            while self.count < target:
                left = deadline - time.perf_counter()
                if left <= 0 or self.proc.poll() is not None:
                    break
                self._cond.wait(min(left, 0.5))
            return self.count, self.last_at

    def wait_ready(self, timeout: float = 10) -> None:
        import socket

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"sink {self.command} did not listen on 127.0.0.1:{self.port}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------- fallback sink (aiosmtpd)


class _CountingHandler:
    """Accept every message and count it; the printer below reports the count."""

    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.count += 1
        return "250 2.0.0 Ok"


async def _serve(host: str, port: int) -> None:
    from aiosmtpd.smtp import SMTP

    handler = _CountingHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler, hostname="sink.local", timeout=100), host, port, backlog=1024)
    last = -1
    async with server:
        while True:
            await asyncio.sleep(0.01)
            if handler.count != last:
                last = handler.count
                sys.stdout.buffer.write(f"mesg={last}\r".encode())
                sys.stdout.buffer.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description="Counting SMTP sink on loopback (fallback when smtp-sink is missing).")
    ap.add_argument("listen", help="127.0.0.1:PORT")
    args = ap.parse_args()
    host, _, port = args.listen.rpartition(":")
    if not host.startswith("127."):
        raise SystemExit("the sink listens on loopback only")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(host, int(port)))


if __name__ == "__main__":
    main()
