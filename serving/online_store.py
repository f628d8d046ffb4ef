"""The Feast store a resolver reads, watched so that a replaced or deleted SQLite file is noticed.

Why: Feast's SQLite online store opens its file once and keeps the connection. When the file is
replaced (a rebuild renamed over it) the open handle keeps reading the OLD inode, so a server
answers 200s from stale data until someone restarts it; when the file is deleted it keeps
answering from the deleted inode, and a fresh process would let sqlite create an empty file in
its place (every user then looks like a cold start). So before each read the resolver asks this
handle for the store: one ``os.stat`` (microseconds) compares the file's identity (device, inode,
size, mtime) with the one the open connection was made for. A different identity means the file
was replaced or written by another process: a fresh ``FeatureStore`` (same resolved config,
~2 ms, its connection opened lazily on the next read) takes over. A missing file is an
``OnlineStoreError`` (HTTP 503, degraded ``/health``) until it is back, and the stale connection
is dropped at once instead of serving from a deleted inode.

Other online stores (Redis) have no file identity; the handle passes them through unchanged.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, NamedTuple, Optional

from serving.errors import OnlineStoreError

LOG = logging.getLogger(__name__)
SQLITE_STORE_TYPE = "sqlite"


class FileIdentity(NamedTuple):
    """What distinguishes one version of the store file from another."""

    device: int
    inode: int
    size: int
    mtime_ns: int


def file_identity(path: Path) -> Optional[FileIdentity]:
    """The identity of `path`, or None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return FileIdentity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def sqlite_path(store: Any) -> Optional[Path]:
    """The SQLite online-store file of a Feast store (resolved as Feast resolves it), else None.

    Stores without a Feast config (a wrapper around one, another online store type) are not
    watched.
    """
    config = getattr(store, "config", None)
    online = getattr(config, "online_store", None)
    if online is None or getattr(online, "type", None) != SQLITE_STORE_TYPE:
        return None
    path = Path(online.path)
    repo_path = getattr(config, "repo_path", None)
    if not path.is_absolute() and repo_path:
        path = Path(repo_path) / path
    return path


class OnlineStoreHandle:
    """Hands out the current Feast store, reopening it when its SQLite file changed identity."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.path = sqlite_path(store)
        self._identity = file_identity(self.path) if self.path is not None else None
        self._lock = threading.Lock()
        self.reopens = 0

    @property
    def store(self) -> Any:
        """The store last handed out (not checked; use :meth:`current` on the request path)."""
        return self._store

    def current(self) -> Any:
        """The store to read now. Raises OnlineStoreError when the SQLite file is missing."""
        if self.path is None:
            return self._store
        identity = file_identity(self.path)
        if identity != self._identity:
            with self._lock:
                if identity != self._identity:
                    self._reopen(identity)
        if identity is None:
            raise OnlineStoreError(
                f"online store file {self.path} is missing (deleted, moved, or never "
                f"materialized); answering 503 until it is back")
        return self._store

    def after_fork(self) -> None:
        """In a freshly forked worker: a new store object, so no connection (SQLite handle, Redis
        socket) opened by the parent is ever shared between processes."""
        from feast import FeatureStore

        old = self._store
        if getattr(old, "config", None) is None:  # not a Feast store: nothing of ours to reopen
            return
        self._lock = threading.Lock()
        self._store = FeatureStore(repo_path=str(old.repo_path), config=old.config)

    def _reopen(self, identity: Optional[FileIdentity]) -> None:
        from feast import FeatureStore

        old = self._store
        # Same resolved config (env-dependent paths were expanded when the first store was
        # built), new object: its SQLite connection opens on the next read, on the new file.
        self._store = FeatureStore(repo_path=str(old.repo_path), config=old.config)
        self.reopens += 1
        if identity is None:
            LOG.warning("online store file %s disappeared: dropped its connection", self.path)
        else:
            LOG.info("online store file %s changed (%s -> %s): reopened", self.path,
                     self._identity, identity)
        self._identity = identity
