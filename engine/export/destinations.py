"""Where export files go: a local directory or an S3-compatible bucket. Whole-file, atomic writes.

A file is either there whole or not at all, under a name derived from its content's id
range, so a batch written twice (a crash between the files and the cursor) overwrites
itself: no duplicate, no torn file. Local files are written to a temporary name, fsynced and
renamed; the directories that received a name are fsynced once per batch (``sync``, before the
exporter moves its cursor), not once per file. S3 objects appear only when their upload completes
(pyarrow's S3 filesystem: no extra dependency, endpoint override for S3-compatible stores).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from engine.config import Settings
from engine.errors import ConfigError


class Destination(Protocol):
    name: str

    def write(self, relpath: str, data: bytes) -> str:
        """Store ``data`` at ``relpath`` whole; returns the full location written."""
        ...

    def sync(self) -> None:
        """Make every file written so far durable (its name included): the cursor may move after this."""
        ...

    def describe(self) -> str: ...


class LocalDirectory:
    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.unsynced: set[Path] = set()

    def describe(self) -> str:
        return str(self.root)

    def write(self, relpath: str, data: bytes) -> str:
        target = self.root / relpath
        created = target.parent
        while not created.is_dir():  # a new directory's name lives in its parent: sync that one too
            self.unsynced.add(created.parent)
            created = created.parent
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        self.unsynced.add(target.parent)
        return str(target)

    def sync(self) -> None:
        for d in sorted(self.unsynced, key=lambda p: -len(p.parts)):  # deepest first
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.unsynced.clear()


class S3Bucket:
    name = "s3"

    def __init__(self, settings: Settings) -> None:
        from pyarrow import fs

        cfg = settings.export.s3
        if not cfg.bucket:
            raise ConfigError("export.s3.bucket is required when export.destination = 's3'")
        self.bucket, self.prefix = cfg.bucket, cfg.prefix
        secret = cfg.secret_key.get_secret_value() if cfg.secret_key is not None else None
        self.fs = fs.S3FileSystem(
            access_key=cfg.access_key, secret_key=secret, region=cfg.region,
            endpoint_override=cfg.endpoint, scheme=cfg.scheme,
            connect_timeout=10, request_timeout=60,
        )
        self.endpoint = cfg.endpoint or "aws"

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/") + f" ({self.endpoint})"

    def key(self, relpath: str) -> str:
        return "/".join(p for p in (self.bucket, self.prefix, relpath) if p)

    def write(self, relpath: str, data: bytes) -> str:
        path = self.key(relpath)
        with self.fs.open_output_stream(path) as out:
            out.write(data)
        return f"s3://{path}"

    def sync(self) -> None:
        """An S3 object is durable when its upload completes: nothing left to do."""


def destination(settings: Settings) -> Destination:
    cfg = settings.export
    if cfg.destination == "s3":
        return S3Bucket(settings)
    return LocalDirectory(cfg.directory or (settings.home / "export"))
