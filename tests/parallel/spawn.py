"""Run a group of gloo worker processes once and collect each rank's verdict per check.

The workers (a test file run as a script: `python FILE RANK OUTDIR`) join a gloo group through a file
store (no port to pick, nothing to race for), run every check in turn and write {check: "ok" | traceback}
to OUTDIR/result{rank}.json after each one. A hung collective cannot hang the suite: the group has a 60 s
timeout and the whole run a hard one.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

RUN_TIMEOUT_S = 180


def init_group(rank: int, world: int, outdir: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{outdir / 'store'}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )


def run_checks(rank: int, outdir: Path, checks: dict[str, Callable[[], None]]) -> None:
    """Worker side: run `checks` in order, recording each verdict; then leave the group."""
    import torch.distributed as dist

    results = {}
    for name, fn in checks.items():
        start = time.perf_counter()
        try:
            fn()
            results[name] = "ok"
            print(f"rank {rank}: {name} ok in {time.perf_counter() - start:.2f}s", flush=True)
        except Exception:  # keep going: one rank failing mid-collective shows up as the group timeout
            results[name] = traceback.format_exc()
        (outdir / f"result{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def spawn(script: str, world: int, outdir: Path) -> tuple[list[dict], list[str]]:
    """Test side: run `script` on `world` processes; returns each rank's results and log."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]
        ),
    )
    if "GLOO_SOCKET_IFNAME" not in env and sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback: no dependence on the host's name resolving
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(r), str(outdir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=RUN_TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{world} worker processes did not finish in {RUN_TIMEOUT_S}s")
    results = []
    for r in range(world):
        path = outdir / f"result{r}.json"
        if not path.exists():
            pytest.fail(f"rank {r} wrote no results (exit {procs[r].returncode}):\n{logs[r][-3000:]}")
        results.append(json.loads(path.read_text()))
    return results, logs


def verdict(results: list[dict], logs: list[str], check: str) -> None:
    """Fail unless every rank reached `check` and passed it."""
    for r, res in enumerate(results):
        if check not in res:
            pytest.fail(f"rank {r} did not reach {check}:\n{logs[r][-3000:]}")
        assert res[check] == "ok", f"rank {r}, {check}:\n{res[check]}"
