"""Instructions per request of two bridge trees, by callgrind: `bench/callgrind.py DIR_A DIR_B`.

Deterministic where CPU time on a shared host is not: each tree (a folder holding a `bridge/`
package, e.g. `git archive <commit> bridge | tar -x -C DIR`) runs under
`valgrind --tool=callgrind` on bench/run.py's broker and instant upstream; instrumentation is
switched on with `callgrind_control` only for the measured requests, after a warm-up, at C = 1 and
C = 128. Two rounds, A B then B A; the count includes every thread of the bridge process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import run as bench_run

LEVELS = ((1, 400, 100), (128, 1500, 300))
"""(concurrency, measured requests, warm-up requests)."""


def total_instructions(dump: Path) -> int:
    """The `totals:` line of a callgrind dump (events: Ir)."""
    for line in dump.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"{dump}: no totals line")


def load(bench: bench_run.Bench, tag: str, concurrency: int, count: int) -> None:
    """`count` chat requests through bench/loadgen.py; every one answered."""
    argv = [
        bench_run.PY,
        str(bench_run.BENCH / "loadgen.py"),
        f"--port={bench.broker_port}",
        f"--prefix={bench_run.PREFIX}",
        f"--tag={tag}",
        f"--count={count}",
        f"--concurrency={concurrency}",
        "--time-limit=600",
        "--stall=120",
        "--direct-count=0",
    ]
    proc = subprocess.run(argv, cwd=bench_run.ROOT, capture_output=True, timeout=900, check=True)
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    if result["ok"] != count:
        raise RuntimeError(f"{tag}: {result['ok']} of {count} answered")


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, check=True)


def measure(
    bench: bench_run.Bench, src: str, instance: str, extra_env: dict[str, str]
) -> dict[int, float]:
    """Instructions per request of the tree in `src`, per concurrency (`extra_env`: overrides)."""
    config = bench.bridge_config(False, instance)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMB_")}
    env.update(
        OPENAI_API_KEY="sk-bench",
        PYTHONPATH=src,
        XDG_STATE_HOME=str(bench.workdir / f"state-{instance}"),
    )
    env.update(extra_env)
    out = bench.workdir / f"{instance}.callgrind"
    argv = [
        *("valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"),
        *(bench_run.PY, "-m", "bridge", "--config", str(config)),
    ]
    topic = f"{bench_run.PREFIX}/request/createChatCompletion/{instance}"
    with bench_run.Prober(bench.broker_port, topic) as prober:
        started = time.monotonic()
        service = bench.spawn(f"bridge-{instance}", argv, env, cwd=bench.workdir)
        if prober.first_reply(started, service, 600) is None:
            raise RuntimeError(f"no reply from the bridge:\n{service.log_tail()}")
    per_request: dict[int, float] = {}
    try:
        for concurrency, count, warmup in LEVELS:
            load(bench, f"w{instance}c{concurrency}", concurrency, warmup)
            control(service.pid, "-z")
            control(service.pid, "-i", "on")
            load(bench, f"m{instance}c{concurrency}", concurrency, count)
            control(service.pid, "-i", "off")
            control(service.pid, "-d", f"c{concurrency}")
            dump = max(
                bench.workdir.glob(f"{instance}.callgrind.*"), key=lambda p: p.stat().st_mtime
            )
            per_request[concurrency] = total_instructions(dump) / count
    finally:
        service.stop(60)
    return per_request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("a", help="folder holding tree A's bridge/ package")
    parser.add_argument("b", help="folder holding tree B's bridge/ package")
    parser.add_argument(
        "--bridge-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for both bridges, e.g. OMB_LOGGING__LEVEL=info (repeatable)",
    )
    args = parser.parse_args()
    extra_env = dict(item.split("=", 1) for item in args.bridge_env)
    work = Path(tempfile.mkdtemp(prefix="omb-callgrind-"))
    bench = bench_run.Bench(plan=bench_run.QUICK, workdir=work, logdir=work)
    bench.start_broker()
    bench.start_upstream()
    try:
        rounds = [(("A", args.a), ("B", args.b)), (("B", args.b), ("A", args.a))]
        for round_no, order in enumerate(rounds, start=1):
            for side, src in order:
                measured = measure(bench, src, f"cg{round_no}{side}", extra_env)
                for concurrency, ir in measured.items():
                    print(
                        f"round {round_no} {side} C={concurrency}: {ir:,.0f} instructions/request"
                    )
    finally:
        bench.close()
    print(f"dumps and logs: {work}")


if __name__ == "__main__":
    main()
