"""Nexus benchmark: compares direct backend, bare aiohttp pass-through and Nexus.

Starts the fake backend, the pass-through proxy and Nexus as subprocesses on
free loopback ports, then drives each target with non-streaming and streaming
chat completions at 1/16/64 closed-loop clients and a paced open-loop rate.

Usage: ``.venv/bin/python bench/load.py [--duration 10] [--quick] [--targets direct,passthrough,nexus] [--json out.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from nexus.testing.processes import stop_process

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
HOST = "127.0.0.1"
MODEL = "bench-model"
STREAM_EVENTS = 21  # 20 chunks + [DONE]
CONCURRENCIES = (1, 16, 64)
PACED_RPS = 50
PACING_SPIN_S = 0.002  # final stretch before a paced send is waited out by yielding, not by a timer
WARMUP_PER_CLIENT = 2
READY_TIMEOUT_S = 20.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
ALL_TARGETS = ("direct", "passthrough", "nexus")
MODES = ("non-stream", "stream")


def _payload(stream: bool) -> bytes:
    return json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 16,
            "stream": stream,
        }
    ).encode()


PAYLOADS = {"non-stream": _payload(False), "stream": _payload(True)}
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer bench"}


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    ready_path: str
    log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def start_server(name: str, args: list[str], port: int, ready_path: str, workdir: Path) -> Server:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=REPO_DIR, stdout=out, stderr=subprocess.STDOUT)
    return Server(name, proc, port, ready_path, log)


async def wait_ready(server: Server) -> None:
    """Poll the readiness endpoint (process startup only; sleeping is fine here)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                break
            try:
                async with session.get(server.url + server.ready_path) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    state = "exited" if server.proc.poll() is not None else "not ready"
    raise RuntimeError(f"{server.name} {state} (rc={server.proc.returncode}); log tail:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    stop_process(server.proc, timeout=5)


# --------------------------------------------------------------------------- CPU accounting


def _descendants(pid: int) -> list[int]:
    pids = [pid]
    try:
        for task in os.scandir(f"/proc/{pid}/task"):
            with open(f"{task.path}/children") as f:
                for child in f.read().split():
                    pids.extend(_descendants(int(child)))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return pids


def _proc_cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of a process and all its descendants, in seconds."""
    return sum(_proc_cpu_ticks(p) for p in _descendants(pid)) / CLK_TCK


# --------------------------------------------------------------------------- load generation


@dataclass
class Run:
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    cpu_s: float = 0.0


async def one_request(session: aiohttp.ClientSession, url: str, mode: str) -> str | None:
    """Send one chat completion and read it fully; return an error label or None."""
    try:
        async with session.post(url, data=PAYLOADS[mode], headers=HEADERS) as resp:
            body = await resp.read()
            if resp.status != 200:
                return f"HTTP {resp.status}"
            if mode == "stream" and body.count(b"data:") != STREAM_EVENTS:
                return "incomplete stream"
            return None
    except Exception as exc:  # any exception is a failed request, reported by type
        return type(exc).__name__


def new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=30)
    )


async def closed_loop(url: str, mode: str, clients: int, duration: float, cpu_pid: int) -> Run:
    run = Run()
    async with new_session() as session:

        async def warmup() -> None:
            for _ in range(WARMUP_PER_CLIENT):
                await one_request(session, url, mode)

        async def client(deadline: float) -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                error = await one_request(session, url, mode)
                if error is None:
                    run.latencies.append(time.perf_counter() - t0)
                else:
                    run.errors[error] += 1

        await asyncio.gather(*(warmup() for _ in range(clients)))
        cpu0 = tree_cpu_seconds(cpu_pid)
        start = time.perf_counter()
        await asyncio.gather(*(client(start + duration) for _ in range(clients)))
        run.elapsed_s = time.perf_counter() - start
        run.cpu_s = tree_cpu_seconds(cpu_pid) - cpu0
    return run


async def open_loop(url: str, mode: str, rate: int, duration: float, cpu_pid: int) -> Run:
    """Launch requests on a fixed schedule; latency counts from the scheduled send time.

    The loop sleeps until shortly before each send time and then yields
    cooperatively until it is reached, so timer granularity and idle wake-ups
    of the load generator do not end up in the measured latency.
    """
    run = Run()
    loop = asyncio.get_running_loop()
    async with new_session() as session:

        async def timed(scheduled: float) -> None:
            error = await one_request(session, url, mode)
            if error is None:
                run.latencies.append(loop.time() - scheduled)
            else:
                run.errors[error] += 1

        await asyncio.gather(*(one_request(session, url, mode) for _ in range(WARMUP_PER_CLIENT)))
        cpu0 = tree_cpu_seconds(cpu_pid)
        start = loop.time()
        tasks = []
        for i in range(int(rate * duration)):
            scheduled = start + i / rate
            await asyncio.sleep(scheduled - loop.time() - PACING_SPIN_S)
            while loop.time() < scheduled:
                await asyncio.sleep(0)
            tasks.append(asyncio.create_task(timed(scheduled)))
        await asyncio.gather(*tasks)
        run.elapsed_s = loop.time() - start
        run.cpu_s = tree_cpu_seconds(cpu_pid) - cpu0
    return run


# --------------------------------------------------------------------------- results


@dataclass
class Result:
    target: str
    mode: str
    load: str
    cpu_of: str
    requests: int
    failed: int
    errors: dict[str, int]
    elapsed_s: float
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    cpu_us_per_req: float | None
    added_p50_ms: float | None = None


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of a non-empty sorted list."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def make_result(target: str, mode: str, load: str, cpu_of: str, run: Run) -> Result:
    lat = sorted(run.latencies)
    n = len(lat)
    return Result(
        target=target,
        mode=mode,
        load=load,
        cpu_of=cpu_of,
        requests=n,
        failed=sum(run.errors.values()),
        errors=dict(run.errors),
        elapsed_s=round(run.elapsed_s, 3),
        rps=n / run.elapsed_s if run.elapsed_s > 0 else 0.0,
        p50_ms=percentile(lat, 0.50) * 1e3 if n else None,
        p99_ms=percentile(lat, 0.99) * 1e3 if n else None,
        cpu_us_per_req=run.cpu_s / n * 1e6 if n else None,
    )


def fill_added_p50(results: list[Result]) -> None:
    direct = {(r.mode, r.load): r.p50_ms for r in results if r.target == "direct"}
    for r in results:
        base = direct.get((r.mode, r.load))
        if r.target != "direct" and base is not None and r.p50_ms is not None:
            r.added_p50_ms = r.p50_ms - base


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown_table(results: list[Result]) -> str:
    lines = [
        "| target | mode | load | req/s | p50 ms | p99 ms | added p50 ms | CPU µs/req | CPU of | ok | failed |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.target} | {r.mode} | {r.load} | {r.rps:.0f} | {_fmt(r.p50_ms)} | {_fmt(r.p99_ms)} "
            f"| {_fmt(r.added_p50_ms)} | {_fmt(r.cpu_us_per_req, 0)} | {r.cpu_of} | {r.requests} | {r.failed} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- orchestration


async def bench_target(target: str, server: Server, duration: float) -> list[Result]:
    """Run every mode and load against one server; CPU is measured on that server's process tree."""
    url = server.url + "/v1/chat/completions"
    pid = server.proc.pid
    cpu_of = "backend" if target == "direct" else "gateway"
    loads: list[tuple[str, int | None]] = [(f"{c} clients", c) for c in CONCURRENCIES]
    loads.append((f"paced {PACED_RPS} rps", None))
    results = []
    for mode in MODES:
        for load, clients in loads:
            if clients is None:
                run = await open_loop(url, mode, PACED_RPS, duration, pid)
            else:
                run = await closed_loop(url, mode, clients, duration, pid)
            result = make_result(target, mode, load, cpu_of, run)
            print(
                f"  {target:<11} {mode:<10} {load:<13} {result.rps:8.0f} req/s  p50 {_fmt(result.p50_ms):>7} ms"
                f"  failed {result.failed}",
                file=sys.stderr,
                flush=True,
            )
            results.append(result)
    return results


def nexus_config(backend_port: int, state: str, workdir: Path) -> str:
    return (
        f'[state]\nbackend = "{state}"\npath = "{workdir / "state.db"}"\n\n'
        "[[backends]]\n"
        'name = "bench"\n'
        f'url = "http://{HOST}:{backend_port}"\n'
        'type = "generic"\n'
        f'models = ["{MODEL}"]\n'
    )


async def run_benchmark(targets: list[str], duration: float, state: str = "sqlite") -> list[Result]:
    py = sys.executable
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="nexus-bench-") as tmp:
        workdir = Path(tmp)
        try:
            port = free_port()
            backend = start_server(
                "backend", [py, str(BENCH_DIR / "fake_backend.py"), "--port", str(port)], port, "/v1/models", workdir
            )
            servers.append(backend)
            gateways: dict[str, Server] = {"direct": backend}
            if "passthrough" in targets:
                port = free_port()
                gateways["passthrough"] = start_server(
                    "passthrough",
                    [py, str(BENCH_DIR / "passthrough.py"), "--port", str(port), "--upstream", backend.url],
                    port,
                    "/v1/models",
                    workdir,
                )
                servers.append(gateways["passthrough"])
            if "nexus" in targets:
                config = workdir / "nexus.toml"
                config.write_text(nexus_config(backend.port, state, workdir))
                port = free_port()
                gateways["nexus"] = start_server(
                    "nexus",
                    [py, "-m", "nexus", "serve", "-c", str(config), "--port", str(port), "--host", HOST,
                     "--no-discovery", "--log-level", "warning"],
                    port,
                    "/health",
                    workdir,
                )
                servers.append(gateways["nexus"])
            await asyncio.gather(*(wait_ready(s) for s in servers))
            print(f"servers ready: {', '.join(f'{s.name}={s.url} pid {s.proc.pid}' for s in servers)}",
                  file=sys.stderr, flush=True)
            results: list[Result] = []
            for target in targets:
                target_results = await bench_target(target, gateways[target], duration)
                if any(r.failed for r in target_results):
                    print(f"{target} had failures; log tail:\n{gateways[target].log_tail()}", file=sys.stderr)
                results.extend(target_results)
            return results
        finally:
            for server in reversed(servers):
                stop_server(server)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 s per run")
    parser.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma-separated subset of %(default)s")
    parser.add_argument("--state", choices=["sqlite", "memory"], default="sqlite",
                        help="Nexus's [state] backend (default sqlite, as a user gets it)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON to PATH")
    args = parser.parse_args()
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(ALL_TARGETS)
    if unknown or not args.targets:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {', '.join(ALL_TARGETS)}")
    if args.quick:
        args.duration = 2.0
    return args


def main() -> int:
    args = parse_args()
    try:
        results = asyncio.run(run_benchmark(args.targets, args.duration, args.state))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    fill_added_p50(results)
    print(markdown_table(results))
    failed = sum(r.failed for r in results)
    if args.json:
        payload = {
            "duration_s": args.duration,
            "targets": args.targets,
            "cpu_count": os.cpu_count(),
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if failed:
        errors: Counter[str] = Counter()
        for r in results:
            errors.update(r.errors)
        print(f"\n{failed} request(s) failed: {dict(errors)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
