"""The Redis state store: one budget and history shared by gateways on several machines.

Why it is shaped this way:

* ``reserve`` and ``settle`` are Lua scripts (EVALSHA), so the check-and-hold and the
  release-and-spend each run as one step inside Redis, whichever gateway sends them.
* Amounts are integer micro-dollars changed with INCRBY/DECRBY, so totals are exact.
* Keys, for ``<p>`` = ``key_prefix``::

      <p>:budget:<month>:spent      micro-dollars spent
      <p>:budget:<month>:reserved   micro-dollars held (running total of the holds below)
      <p>:budget:<month>:holds      hash: reservation id -> "micros:created:owner"
      <p>:history                   list of msgspec-JSON HistoryEntry, newest first, capped at 1000
      <p>:quality:<backend id>      msgspec-JSON list[QualityBucket]

* History and quality writes never wait on Redis in the request path: they go to a queue
  that one background task writes out in pipelines. A failure is logged once, not raised.
* A caller cancelled while its ``reserve``/``settle`` is in flight does not leave the ledger
  wrong: the command runs to its end in a task, and a hold nobody will settle is released.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from collections import deque
from collections.abc import Coroutine
from typing import Any

import msgspec
import redis.asyncio as aioredis

from redis.exceptions import RedisError

from nexus.errors import ConfigError
from nexus.redact import redact_url as redacted
from nexus.state.base import HistoryEntry, QualityBucket, StateStore, decode_history
from nexus.state.sqlite import from_micros, this_owner, to_micros

log = logging.getLogger("nexus.state")

HISTORY_KEEP = 1000
MAX_PENDING = 10 * HISTORY_KEEP  # queued history/quality writes kept while Redis lags
MAX_CONNECTIONS = 32  # concurrent commands beyond this wait for a connection, not open more

# KEYS: spent, reserved, holds. ARGV: id, micros, limit micros ('' = none), hold record.
# An id already held stays held as it is (a retried reserve is not counted twice).
_RESERVE = """
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 1 end
if ARGV[3] ~= '' then
  local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
  local reserved = tonumber(redis.call('GET', KEYS[2]) or '0')
  if spent + reserved + tonumber(ARGV[2]) > tonumber(ARGV[3]) then return 0 end
end
redis.call('INCRBY', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
return 1
"""

# KEYS: spent, reserved, holds. ARGV: id, actual micros ('' = the held amount, and only when
# still held: how reclaim settles). Returns the micro-dollars added to spend.
_SETTLE = """
local actual = ARGV[2]
local hold = redis.call('HGET', KEYS[3], ARGV[1])
if hold then
  local held = string.match(hold, '^(%-?%d+)')
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('DECRBY', KEYS[2], held)
  if actual == '' then actual = held end
elseif actual == '' or ARGV[1] ~= '' then
  -- no hold: a reclaim already charged its worst case, which stands (never count twice)
  return 0
end
redis.call('INCRBY', KEYS[1], actual)
return tonumber(actual)
"""

# KEYS: holds. ARGV: now, then reservation ids. Rewrites each hold's "created" time.
_TOUCH = """
for i = 2, #ARGV do
  local hold = redis.call('HGET', KEYS[1], ARGV[i])
  if hold then
    local micros, owner = string.match(hold, '^(%-?%d+):[^:]*:(.*)$')
    redis.call('HSET', KEYS[1], ARGV[i], micros .. ':' .. ARGV[1] .. ':' .. owner)
  end
end
return 1
"""

_buckets_decoder = msgspec.json.Decoder(list[QualityBucket])
_encoder = msgspec.json.Encoder()


class RedisStore(StateStore):
    """State in Redis at ``url``, every key under ``key_prefix`` (``[state] backend = "redis"``)."""

    kind = "redis"

    def __init__(self, url: str, key_prefix: str, *, owner: str | None = None) -> None:
        self.url = url
        self.prefix = key_prefix
        self.owner = owner or this_owner()
        self._client: aioredis.Redis | None = None
        self._reserve: Any = None
        self._settle: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()  # settles and releases outliving their callers
        # Fire-and-forget writes: ("history", data) or ("quality", backend_id, data).
        self._pending: deque[tuple[str, ...]] = deque()
        self._queued = 0  # writes ever queued; with _handled, lets a read wait for earlier writes
        self._handled = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._stopping = False
        self._failed_once = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._client is not None:
            return
        shown = redacted(self.url)
        if not self.url:
            raise ConfigError("state.url is not set: [state] backend = 'redis' needs url = 'redis://host:6379/0'")
        try:
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url, max_connections=MAX_CONNECTIONS, timeout=10, socket_connect_timeout=5, socket_timeout=10)
        except ValueError as exc:
            raise ConfigError(f"state.url = {shown!r} is invalid: {exc}") from None
        client = aioredis.Redis.from_pool(pool)
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            await client.aclose()
            why = str(exc).strip().rstrip(".") or type(exc).__name__
            raise ConfigError(f"state.url = {shown!r} is not reachable: {why}; start Redis there or "
                              "set [state] url") from None
        self._client = client
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._touch = client.register_script(_TOUCH)
        self._wake = asyncio.Event()
        self._writer = asyncio.create_task(self._write_loop(), name="nexus-state-redis-writer")

    async def close(self) -> None:
        """Write out the queued history and quality, let in-flight settles finish, disconnect."""
        if self._client is None or self._stopping:
            return
        self._stopping = True
        assert self._wake is not None and self._writer is not None
        self._wake.set()
        await self._writer
        while self._tasks:  # a finishing reserve may still spawn its release
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _ledger_keys(self, month: str) -> list[str]:
        return [self._key("budget", month, "spent"), self._key("budget", month, "reserved"),
                self._key("budget", month, "holds")]

    def _check_open(self) -> aioredis.Redis:
        if self._client is None or self._stopping:
            raise RuntimeError(f"state store {redacted(self.url)} is not open")
        return self._client

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` to its end even if whoever awaits it is cancelled; close() waits for it."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("state: a ledger command failed: %s", task.exception())

    # -- budget ledger -----------------------------------------------------------------------

    async def reserve(self, month: str, reservation_id: str, amount: float, limit: float | None) -> bool:
        self._check_open()
        micros = to_micros(amount)
        record = f"{micros}:{time.time():.3f}:{self.owner}"
        args = [reservation_id, micros, "" if limit is None else to_micros(limit), record]
        task = self._spawn(self._reserve(keys=self._ledger_keys(month), args=args))
        try:
            return bool(await asyncio.shield(task))
        except asyncio.CancelledError:
            task.add_done_callback(lambda t: self._release_if_held(t, month, reservation_id))
            raise

    def _release_if_held(self, task: asyncio.Task[Any], month: str, reservation_id: str) -> None:
        if not task.cancelled() and task.exception() is None and task.result():
            self._spawn(self._settle(keys=self._ledger_keys(month), args=[reservation_id, 0]))

    async def settle(self, month: str, reservation_id: str, actual: float) -> None:
        self._check_open()
        await asyncio.shield(self._spawn(self._settle(keys=self._ledger_keys(month),
                                                      args=[reservation_id, to_micros(actual)])))

    async def touch(self, month: str, reservation_ids: list[str]) -> None:
        self._check_open()
        if reservation_ids:
            await self._touch(keys=[self._ledger_keys(month)[2]], args=[f"{time.time():.3f}", *reservation_ids])

    async def totals(self, month: str) -> tuple[float, float]:
        spent, reserved = await self._check_open().mget(self._ledger_keys(month)[:2])
        return from_micros(int(spent or 0)), from_micros(int(reserved or 0))

    async def reclaim(self, older_than_seconds: float) -> float:
        """Settle holds older than the age, whoever holds them: Redis cannot tell whether a
        process on another machine still runs, so the age must exceed the longest request."""
        client = self._check_open()
        cutoff = time.time() - older_than_seconds
        head, tail = self._key("budget", ""), ":holds"
        moved = 0
        async for raw in client.scan_iter(match=_glob_escape(head) + "*" + tail, count=500):
            key = raw.decode() if isinstance(raw, bytes) else raw
            month = key[len(head):-len(tail)]
            for rid, hold in (await client.hgetall(key)).items():
                _, created, _ = (hold.decode() if isinstance(hold, bytes) else hold).split(":", 2)
                if float(created) <= cutoff:
                    moved += int(await self._settle(keys=self._ledger_keys(month), args=[rid, ""]))
        return from_micros(moved)

    # -- fire-and-forget writes ----------------------------------------------------------------

    def _enqueue(self, item: tuple[str, ...]) -> None:
        if self._wake is None or self._stopping:
            return  # not open, or closed: the caller must not fail for it
        if len(self._pending) >= MAX_PENDING:  # Redis is slow or away: drop the oldest, never grow
            self._pending.popleft()
            self._handled += 1  # as if written, so readers waiting for it are not held up
        self._pending.append(item)
        self._queued += 1
        self._wake.set()

    async def _written(self) -> None:
        """Wait until every write queued before this call has reached Redis (or failed)."""
        if self._handled >= self._queued:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self._queued, waiter))
        await waiter

    async def _write_loop(self) -> None:
        assert self._wake is not None and self._client is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = [self._pending.popleft() for _ in range(min(len(self._pending), HISTORY_KEEP))]
                try:
                    await self._write(self._client, batch)
                except Exception as exc:  # never raised to anyone: the request path does not wait
                    if not self._failed_once:
                        self._failed_once = True
                        log.error("state: writing history/quality to %s failed (further failures not "
                                  "logged): %s", redacted(self.url), exc)
                self._handled += len(batch)
                still = []
                for target, waiter in self._waiters:
                    if target <= self._handled:
                        if not waiter.done():
                            waiter.set_result(None)
                    else:
                        still.append((target, waiter))
                self._waiters = still
            if self._stopping:
                return

    async def _write(self, client: aioredis.Redis, batch: list[tuple[str, ...]]) -> None:
        history = [item[1] for item in batch if item[0] == "history"]
        async with client.pipeline(transaction=False) as pipe:
            if history:
                pipe.lpush(self._key("history"), *history)  # the last pushed ends up first: newest
                pipe.ltrim(self._key("history"), 0, HISTORY_KEEP - 1)
            for item in batch:
                if item[0] == "quality":
                    pipe.set(self._key("quality", item[1]), item[2])
            await pipe.execute()

    # -- request history ---------------------------------------------------------------------

    def append_history(self, entry: HistoryEntry) -> None:
        self._enqueue(("history", _encoder.encode(entry).decode()))

    async def recent_history(self, limit: int) -> list[HistoryEntry]:
        if limit <= 0:
            return []
        client = self._check_open()
        await self._written()
        newest_first = await client.lrange(self._key("history"), 0, min(limit, HISTORY_KEEP) - 1)
        return decode_history(reversed(newest_first))

    # -- quality history ---------------------------------------------------------------------

    def save_quality(self, backend_id: str, buckets: list[QualityBucket]) -> None:
        self._enqueue(("quality", backend_id, _encoder.encode(buckets).decode()))

    async def load_quality(self, backend_id: str) -> list[QualityBucket]:
        client = self._check_open()
        await self._written()
        data = await client.get(self._key("quality", backend_id))
        return [] if data is None else _buckets_decoder.decode(data)


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a Redis SCAN/KEYS pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
