"""The SQLite state store: one file, shared by every gateway process of one machine.

Why it is shaped this way:

* The event loop never touches the file. One writer thread owns the only connection and
  runs the operations the loop queues, in order; awaited ones complete an asyncio future
  through ``loop.call_soon_threadsafe``. History and quality writes are fire-and-forget.
* Operations queued together run in one transaction (one commit for many requests), each
  inside a savepoint so that one failing cannot undo the others.
* ``BEGIN IMMEDIATE`` takes the file's write lock before the ledger is read, so
  ``reserve``'s check-and-hold is atomic across processes sharing the file, and
  ``busy_timeout`` makes the other processes wait their turn instead of failing.
* WAL with ``synchronous=NORMAL``: a commit survives a crash of the process (not of the
  machine), without an fsync per request.
* Amounts are stored as integer micro-dollars, so sums are exact and a limit of 1.00 admits
  exactly 100 holds of 0.01, whatever the order of additions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import socket
import sqlite3
import threading
import time

from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from nexus.errors import ConfigError
from nexus.state.base import HistoryEntry, QualityBucket, StateStore, decode_history

log = logging.getLogger("nexus.state")

T = TypeVar("T")

SCHEMA_VERSION = 1
HISTORY_KEEP = 1000
BUSY_TIMEOUT_MS = 5000
MAX_BATCH = 512  # operations per transaction: bounds how long one commit holds the lock
# History rows are gathered on the event loop and written together at most this often: one
# transaction per request made the writer thread compete with the loop for the GIL on every
# request (Nexus's throughput halved under load). A crash loses at most this much history.
HISTORY_FLUSH_SECONDS = 1.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spend (
    month TEXT PRIMARY KEY,
    micros INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY,
    month TEXT NOT NULL,
    micros INTEGER NOT NULL,
    owner TEXT NOT NULL,      -- "hostname:pid" of the gateway that holds it
    created REAL NOT NULL     -- unix seconds
);
CREATE INDEX IF NOT EXISTS reservations_month ON reservations (month);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY,  -- rowid: always max + 1, so the newest 1000 are seq > max - 1000
    entry BLOB NOT NULL       -- msgspec JSON of HistoryEntry
);
CREATE TABLE IF NOT EXISTS quality (
    backend_id TEXT PRIMARY KEY,
    buckets BLOB NOT NULL     -- msgspec JSON of list[QualityBucket]
);
"""

_buckets_decoder = msgspec.json.Decoder(list[QualityBucket])
_encoder = msgspec.json.Encoder()


def to_micros(usd: float) -> int:
    """USD as integer micro-dollars (the unit every ledger sum is done in)."""
    return round(usd * 1_000_000)


def from_micros(micros: int) -> float:
    return micros / 1_000_000


def this_owner() -> str:
    """``"hostname:pid"``: who holds a reservation, so a dead holder can be recognised."""
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_is_dead(pid: int) -> bool:
    """True only when no process ``pid`` exists on this host (a process of another user is alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class _Op:
    """One unit of work for the writer thread; ``done`` is None for fire-and-forget ones."""

    __slots__ = ("fn", "write", "done")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any], write: bool, done: Future[Any] | None) -> None:
        self.fn = fn
        self.write = write
        self.done = done


_STOP = object()


class SqliteStore(StateStore):
    """State in the SQLite file ``path`` (``[state] backend = "sqlite"``)."""

    kind = "sqlite"

    def __init__(self, path: Path, *, owner: str | None = None) -> None:
        self.path = Path(path)
        self.owner = owner or this_owner()  # overridable so tests can play another host
        self._queue: queue.SimpleQueue[_Op | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._failed_once = False  # a fire-and-forget failure is logged once, not per write
        self._history_added = False  # writer thread only: history rows added in this transaction
        self._history_rows: list[tuple[bytes]] = []  # event loop only: waiting for the next flush
        self._history_flush: asyncio.TimerHandle | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._thread is not None:
            return
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=f"nexus-state-{self.path.name}",
                                        daemon=True)
        self._thread.start()
        try:
            await asyncio.wrap_future(ready)
        except BaseException:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            raise

    async def close(self) -> None:
        """Let the writer finish everything queued (one last transaction), then close the file."""
        if self._thread is None or self._closed:
            return
        self._flush_history()
        self._closed = True
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)

    def _unusable(self, why: str, todo: str) -> ConfigError:
        return ConfigError(f"state.path = {str(self.path)!r} is not usable: {why}; {todo}")

    def _connect(self) -> sqlite3.Connection:
        """Open (creating directory and file), configure and migrate; ConfigError when impossible."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            blocker = next((p for p in self.path.parents if p.exists()), None)
            if blocker is not None and not blocker.is_dir():
                why = f"{str(blocker)!r} is a file, not a directory"
            else:
                why = f"cannot create directory {str(self.path.parent)!r} ({exc.strerror or exc})"
            raise self._unusable(why, "make the directory writable or set [state] path") from None
        conn: sqlite3.Connection | None = None
        try:
            # isolation_level=None: we issue BEGIN ourselves (IMMEDIATE when writing).
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("state file %s: journal_mode is %s, not wal", self.path, mode)
            conn.execute("PRAGMA synchronous = NORMAL")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]  # cheap: the file stays small
            if check != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed ({check})")
            self._migrate(conn)
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                conn.close()
            message = str(exc)
            if "not a database" in message or "malformed" in message:
                raise self._unusable(message, "move it away or set [state] path") from None
            if "newer" in message:
                raise self._unusable(message, "upgrade Nexus or set [state] path") from None
            raise self._unusable(message, "make the file and its directory writable or set [state] path") from None
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")  # several gateways may start at once on a fresh file
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"written by a newer Nexus (schema {version}, this one knows "
                                            f"{SCHEMA_VERSION})")
            if version < SCHEMA_VERSION:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            else:
                # Rewriting the header is a write even with nothing to migrate: a read-only
                # file or directory must fail here, at start-up, not on the first request.
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # -- the writer thread -------------------------------------------------------------------

    def _run(self, ready: Future[None]) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:  # handed to open(), which raises it in the loop
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            stop = False
            while not stop:
                batch: list[_Op] = []
                item = self._queue.get()
                while True:
                    if item is _STOP:
                        stop = True  # finish what was queued before close(), then leave
                    else:
                        assert isinstance(item, _Op)
                        batch.append(item)
                    if len(batch) >= MAX_BATCH:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                if batch:
                    self._run_batch(conn, batch)
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        """Run ``batch`` in one transaction; results are handed out only after the commit."""
        results: list[tuple[_Op, Any, Exception | None]] = []
        self._history_added = False
        try:
            conn.execute("BEGIN IMMEDIATE" if any(op.write for op in batch) else "BEGIN")
            for op in batch:
                conn.execute("SAVEPOINT op")
                error: Exception | None = None
                try:
                    result = op.fn(conn)
                    conn.execute("RELEASE op")
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    result, error = None, exc
                results.append((op, result, error))
            if self._history_added:  # once per transaction, so the file never holds more than 1000
                conn.execute("DELETE FROM history WHERE seq <= (SELECT MAX(seq) FROM history) - ?",
                             (HISTORY_KEEP,))
            conn.execute("COMMIT")
        except Exception as exc:  # busy past busy_timeout, disk full, ...: the whole batch failed
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the connection rolls back by itself; the callers learn of exc below
            results = [(op, None, exc) for op in batch]
        for op, result, error in results:
            if op.done is not None:
                try:
                    if error is None:
                        op.done.set_result(result)
                    else:
                        op.done.set_exception(error)
                except InvalidStateError:
                    pass  # the awaiting caller was cancelled; the work is done all the same
            elif error is not None and not self._failed_once:
                self._failed_once = True
                log.error("state file %s: a queued write failed (further failures not logged): %s",
                          self.path, error)

    # -- queueing ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._thread is None or self._closed:
            raise RuntimeError(f"state store {self.path} is not open")

    def _submit(self, fn: Callable[[sqlite3.Connection], T], *, write: bool) -> Future[T]:
        self._check_open()
        done: Future[T] = Future()
        self._queue.put(_Op(fn, write, done))
        return done

    async def _call(self, fn: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        return await asyncio.wrap_future(self._submit(fn, write=write))

    def _enqueue(self, fn: Callable[[sqlite3.Connection], Any]) -> None:
        if self._thread is None or self._closed:
            return  # after close(): nothing can be written any more, and the caller must not fail
        self._queue.put(_Op(fn, True, None))

    # -- budget ledger -----------------------------------------------------------------------

    async def reserve(self, month: str, reservation_id: str, amount: float, limit: float | None) -> bool:
        """An id already held stays held as it is (a retried reserve is not counted twice)."""
        micros = to_micros(amount)
        limit_micros = None if limit is None else to_micros(limit)
        owner, created = self.owner, time.time()

        def op(conn: sqlite3.Connection) -> bool:
            if conn.execute("SELECT 1 FROM reservations WHERE id = ?", (reservation_id,)).fetchone():
                return True
            if limit_micros is not None:
                spent, reserved = _totals(conn, month)
                if spent + reserved + micros > limit_micros:
                    return False
            conn.execute("INSERT INTO reservations (id, month, micros, owner, created) VALUES (?, ?, ?, ?, ?)",
                         (reservation_id, month, micros, owner, created))
            return True

        done = self._submit(op, write=True)
        try:
            return await asyncio.shield(asyncio.wrap_future(done))
        except asyncio.CancelledError:
            # The thread runs the op all the same, and the caller will never settle a hold it
            # did not hear of: release it (queued after the op, so it runs after it).
            self._enqueue(lambda conn: conn.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,)))
            raise

    async def settle(self, month: str, reservation_id: str, actual: float) -> None:
        micros = to_micros(actual)
        await self._call(lambda conn: _settle(conn, month, reservation_id, micros), write=True)

    async def touch(self, month: str, reservation_ids: list[str]) -> None:
        now = time.time()
        rows = [(now, rid) for rid in reservation_ids]
        await self._call(lambda conn: conn.executemany("UPDATE reservations SET created = ? WHERE id = ?", rows),
                         write=True)

    async def totals(self, month: str) -> tuple[float, float]:
        spent, reserved = await self._call(lambda conn: _totals(conn, month), write=False)
        return from_micros(spent), from_micros(reserved)

    async def reclaim(self, older_than_seconds: float) -> float:
        """Holds of this host are reclaimed when their process is gone, never while it lives
        (however long its request runs); holds of other hosts when older than the age."""
        host = self.owner.rsplit(":", 1)[0]

        def op(conn: sqlite3.Connection) -> int:
            cutoff = time.time() - older_than_seconds
            moved = 0
            rows = conn.execute("SELECT id, month, micros, owner, created FROM reservations").fetchall()
            for rid, month, micros, owner, created in rows:
                owner_host, _, pid = str(owner).rpartition(":")
                if owner_host == host and pid.isdigit():
                    dead = pid_is_dead(int(pid))
                else:
                    dead = created <= cutoff
                if dead:
                    _settle(conn, month, rid, micros)
                    moved += micros
            return moved

        return from_micros(await self._call(op, write=True))

    # -- request history ---------------------------------------------------------------------

    def append_history(self, entry: HistoryEntry) -> None:
        if self._thread is None or self._closed:
            return
        self._history_rows.append((_encoder.encode(entry),))
        if self._history_flush is None:
            self._history_flush = asyncio.get_running_loop().call_later(HISTORY_FLUSH_SECONDS, self._flush_history)

    def _flush_history(self) -> None:
        """Queue the gathered history rows as one write."""
        if self._history_flush is not None:
            self._history_flush.cancel()
            self._history_flush = None
        rows, self._history_rows = self._history_rows, []
        if not rows:
            return

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT INTO history (entry) VALUES (?)", rows)
            self._history_added = True  # read by the same thread, which prunes before committing

        self._enqueue(op)

    async def recent_history(self, limit: int) -> list[HistoryEntry]:
        if limit <= 0:
            return []
        n = min(limit, HISTORY_KEEP)
        self._flush_history()  # a reader sees every entry appended before it asked

        def op(conn: sqlite3.Connection) -> list[bytes]:
            rows = conn.execute("SELECT entry FROM history ORDER BY seq DESC LIMIT ?", (n,)).fetchall()
            return [row[0] for row in reversed(rows)]

        return decode_history(await self._call(op, write=False))

    # -- quality history ---------------------------------------------------------------------

    def save_quality(self, backend_id: str, buckets: list[QualityBucket]) -> None:
        data = _encoder.encode(buckets)
        self._enqueue(lambda conn: conn.execute(
            "INSERT INTO quality (backend_id, buckets) VALUES (?, ?) "
            "ON CONFLICT (backend_id) DO UPDATE SET buckets = excluded.buckets", (backend_id, data)))

    async def load_quality(self, backend_id: str) -> list[QualityBucket]:
        def op(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT buckets FROM quality WHERE backend_id = ?", (backend_id,)).fetchone()
            return None if row is None else row[0]

        data = await self._call(op, write=False)
        return [] if data is None else _buckets_decoder.decode(data)


def _totals(conn: sqlite3.Connection, month: str) -> tuple[int, int]:
    row = conn.execute("SELECT micros FROM spend WHERE month = ?", (month,)).fetchone()
    reserved = conn.execute("SELECT COALESCE(SUM(micros), 0) FROM reservations WHERE month = ?",
                            (month,)).fetchone()[0]
    return (row[0] if row else 0), reserved


def _settle(conn: sqlite3.Connection, month: str, reservation_id: str, micros: int) -> None:
    deleted = conn.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,)).rowcount
    if reservation_id and not deleted:
        return  # a reclaim already charged this hold's worst case, which stands (never count twice)
    conn.execute("INSERT INTO spend (month, micros) VALUES (?, ?) "
                 "ON CONFLICT (month) DO UPDATE SET micros = micros + excluded.micros", (month, micros))

