"""Upload side of the cloud path: photos into the object store, then ``photo.uploaded`` events.

The object store is a folder (``settings.object_store``) addressed by content: a photo lives at
``<sha256[:2]>/<sha256>``, so uploading the same bytes twice stores them once and a worker can
check what it reads against the event. An event is sent only after the copy is durable (file
and folder fsynced, then renamed into place), so no worker ever sees an event whose bytes a
crash could still take away.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used, so `facecluster --help` stays quick
    from .bus import Bus

# Photos copied and announced per round trip to the broker.
CHUNK = 64


@dataclass
class PublishSummary:
    published: int = 0
    stored_bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (uri, reason) not published


def object_key(sha256: str) -> str:
    return f"{sha256[:2]}/{sha256}"


def upload_key(user: str, sha256: str) -> str:
    """The ``photo.uploaded`` key: one user's photos spread over every partition (indexing
    needs no per-user order), while the same bytes of the same user always meet in one, so no
    two workers store one photo at the same time."""
    return f"{user}/{sha256}"


def read_object(store: Path, key: str, sha256: str, max_bytes: int) -> bytes | str:
    """The object's bytes, or why they cannot be had: missing, unreadable, over ``max_bytes``,
    or not the bytes ``sha256`` names (a permanent failure for that photo either way)."""
    from facecore.decode import PhotoError, read_bytes

    try:
        data = read_bytes(store / key, max_bytes)
    except PhotoError as e:
        return f"object {key}: {e.reason}"
    if hashlib.sha256(data).hexdigest() != sha256:
        return f"object {key}: bytes do not match their sha256"
    return data


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_object(root: Path, key: str, data: bytes) -> bool:
    """Write the object unless it is already there; True if written (its folder needs an fsync)."""
    path = root / key
    if path.is_file() and path.stat().st_size == len(data):
        return False  # same name means same bytes; a partial copy never gets this name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return True


def publish_photos(bus: Bus, store: Path, user: str, items: Iterable[tuple[str, Path]], *,
                   max_bytes: int) -> PublishSummary:
    """items: (uri, local file). Copies each into ``store`` and announces it for ``user``.

    Unreadable files are reported and not announced: there are no bytes a worker could index.
    """
    from facecore.decode import PhotoError, read_bytes

    from .bus import UPLOADED

    summary = PublishSummary()
    items = iter(items)
    while chunk := list(itertools.islice(items, CHUNK)):
        events, folders = [], set()
        for uri, path in chunk:
            try:
                data = read_bytes(path, max_bytes)
            except PhotoError as e:
                summary.skipped.append((uri, e.reason))
                continue
            sha256 = hashlib.sha256(data).hexdigest()
            key = object_key(sha256)
            if _write_object(store, key, data):
                folders.add((store / key).parent)
                summary.stored_bytes += len(data)
            events.append((upload_key(user, sha256), {"user": user, "uri": uri, "object_key": key, "sha256": sha256}))
        for folder in folders:
            _fsync_dir(folder)  # the renames are durable too
        bus.publish(UPLOADED, events)
        summary.published += len(events)
    return summary


def cmd_publish(args) -> None:
    from facecore.settings import Settings

    from .bus import MemoryBus, connect
    from .indexing import folder_items

    if args.config:
        os.environ["FACECLUSTER_CONFIG"] = str(args.config)
    settings = Settings(**({"bus_url": args.bus} if args.bus else {}))
    root = Path(args.dir)
    if not root.is_dir():
        raise SystemExit(f"not a folder: {root}")
    bus = connect(settings.bus_url)
    if isinstance(bus, MemoryBus):
        raise SystemExit(f"publish needs a shared bus such as kafka://host:port (--bus or FACECLUSTER_BUS_URL); "
                         f"{settings.bus_url} only lives inside one process")
    try:
        bus.ensure_topics()
        summary = publish_photos(bus, settings.object_store, args.user, folder_items(root),
                                 max_bytes=settings.max_bytes)
    finally:
        bus.close()
    print(f"published {summary.published} photos for {args.user} "
          f"({summary.stored_bytes / 1e6:.1f} MB new in {settings.object_store}), {len(summary.skipped)} skipped")
    for reason, n in Counter(reason for _, reason in summary.skipped).most_common():
        print(f"  skipped: {n} x {reason}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``facecluster publish`` subcommand."""
    sp = sub.add_parser("publish", help="copy the photos under DIR into the object store and announce them "
                                        "on the bus (photo.uploaded) for the ingest workers")
    sp.add_argument("dir")
    sp.add_argument("--user", required=True, help="whose photos")
    sp.add_argument("--bus", help="bus URL (default: FACECLUSTER_BUS_URL), e.g. kafka://host:9092")
    sp.add_argument("--config", type=Path, help="TOML settings file")
    sp.set_defaults(func=cmd_publish)
