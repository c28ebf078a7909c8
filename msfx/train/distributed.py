"""Data-parallel training under MindSpore's `msrun`, with optional ZeRO-1 optimizer-state sharding.

`msrun --worker_num=N --local_worker_num=N --master_addr=127.0.0.1 --master_port=P script.py` starts
N workers with `MS_ROLE=MS_WORKER`; `data_parallel()` then initializes `mindspore.communication`
(the `mccl` TCP backend on CPU) and returns a `DataParallel`, which a `TrainStep` uses inside its
compiled update graph:

- plain data parallel (`zero_stage=0`): every worker holds the parameters and the whole optimizer
  state; the micro-batch gradients of every worker (and the window's loss) are summed with
  `ops.AllReduce` over buckets of concatenated leaves (one collective per ~25 MB instead of one per
  leaf: each costs ~2.6 ms of latency on two local workers, measured), then each worker clips and
  updates identically. The losses are normalized by the window's item count summed over the
  workers, so the sum of their gradients is the gradient of the whole global batch, as one process
  computes it (summed in another order: the last bits differ);
- ZeRO-1 (`zero_stage=1`): the parameters, flattened into one vector, are cut into N equal
  contiguous slices; a worker keeps the optimizer state of its slice only (1/N of it), updates its
  slice, and an `ops.AllGather` of the updated slices rebuilds the parameters on every worker. The
  gradients are all-reduced as in plain DP (MindSpore 2.10's CPU backend has no `ReduceScatter`:
  "Unsupported op [ReduceScatter] on CPU"), so the clipping norm is computed as there; the optimizer
  sees the slice as a list of segments (the pieces of the leaves it covers), so its elementwise
  arithmetic and per-leaf weight-decay mask are those of plain DP and the numbers are identical.

Host-side helpers (`sum_host`, `barrier`, `full_state`) are eager collectives that every worker
must call at the same point. `launch` starts a script under `msrun` from Python (tests, benchmarks)
and leaves no worker behind.
"""
from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

ZERO_STAGES = (0, 1)
BUCKET_BYTES = 25 * 2 ** 20  # torch DDP's default bucket size


def under_msrun() -> bool:
    """True in a process started by `msrun`: a worker (`MS_ROLE=MS_WORKER`) or the scheduler
    (`MS_SCHED`, which runs the same script and serves the cluster from `init()` until the end)."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")


def world() -> tuple[int, int]:
    """`(rank, world_size)`: `mindspore.communication` initialized once under `msrun`, else `(0, 1)`.
    The scheduler process never returns from it."""
    if not under_msrun():
        return 0, 1
    from mindspore.communication import GlobalComm, get_group_size, get_rank, init
    if not GlobalComm.INITED:
        init()
    return get_rank(), get_group_size()


class DataParallel:
    """The collectives of one data-parallel training run (see the module docstring).

    Args:
        rank, world_size: this worker and the number of workers (`world()`).
        zero_stage: 0 (plain data parallel) or 1 (the optimizer state sharded over the workers).
        bucket_bytes: the most bytes of gradients summed by one AllReduce.

    Raises:
        ValueError: `zero_stage` not in (0, 1), or `rank` outside `[0, world_size)`.
    """

    def __init__(self, rank: int, world_size: int, zero_stage: int = 0, bucket_bytes: int = BUCKET_BYTES):
        if zero_stage not in ZERO_STAGES:
            raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, got {zero_stage!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self.rank, self.world_size, self.zero_stage, self.bucket_bytes = rank, world_size, zero_stage, bucket_bytes
        self._all_reduce = ops.AllReduce(ops.ReduceOp.SUM)
        self._all_gather = ops.AllGather()
        self._sizes: list[int] = []
        self._shapes: list[tuple[int, ...]] = []
        self.segments: list[tuple[int, int, int]] = []

    @property
    def sharded(self) -> bool:
        return self.zero_stage == 1

    def bind(self, shapes: Sequence[Sequence[int]]) -> "DataParallel":
        """Set the parameter leaves' shapes: the buckets and, with ZeRO-1, this worker's `segments`
        (`(leaf index, start, stop)` ranges of the flattened leaves, in order). Returns self."""
        self._shapes = [tuple(int(d) for d in s) for s in shapes]
        self._sizes = [math.prod(s) for s in self._shapes]
        total = sum(self._sizes)
        self.shard = math.ceil(total / self.world_size) if total else 0
        lo, hi = self.rank * self.shard, min((self.rank + 1) * self.shard, total)
        self.segments, offset = [], 0
        for i, size in enumerate(self._sizes):
            a, b = max(lo, offset), min(hi, offset + size)
            if a < b:
                self.segments.append((i, a - offset, b - offset))
            offset += size
        return self

    # ---------------------------------------------------------------- inside the compiled update

    def reduce(self, grads: Sequence[Tensor], loss: Tensor) -> tuple[list[Tensor], Tensor]:
        """The gradients and the 0-d loss summed over the workers (AllReduce over buckets)."""
        flat = [loss.reshape(1)] + [g.reshape(-1) for g in grads]
        sizes = [1] + list(self._sizes)
        out, bucket, used = [], [], 0
        for x, size in zip(flat, sizes):
            if bucket and (used + size) * 4 > self.bucket_bytes:
                out.extend(self._reduce_bucket(bucket))
                bucket, used = [], 0
            bucket.append((x, size))
            used += size
        out.extend(self._reduce_bucket(bucket))
        return [x.reshape(shape) for x, shape in zip(out[1:], self._shapes)], out[0].reshape(())

    def _reduce_bucket(self, bucket: list[tuple[Tensor, int]]) -> list[Tensor]:
        if len(bucket) == 1:
            return [self._all_reduce(bucket[0][0])]
        summed = self._all_reduce(ops.concat([x for x, _ in bucket]))
        return list(ops.split(summed, [size for _, size in bucket]))

    def local(self, leaves: Sequence[Tensor]) -> list[Tensor]:
        """The leaves this worker updates: all of them, or with ZeRO-1 its `segments` (1-d)."""
        if not self.sharded:
            return list(leaves)
        return [leaves[i].reshape(-1)[a:b] for i, a, b in self.segments]

    def local_decay(self, decay: Sequence[bool]) -> tuple[bool, ...]:
        """The weight-decay mask of `local(...)`."""
        return tuple(decay) if not self.sharded else tuple(decay[i] for i, _, _ in self.segments)

    def gather(self, local: Sequence[Tensor]) -> list[Tensor]:
        """The full leaves from every worker's updated `local(...)` leaves (AllGather with ZeRO-1)."""
        if not self.sharded:
            return list(local)
        return self._unshard(self._all_gather(self._padded(local)))

    def _padded(self, local: Sequence[Tensor]) -> Tensor:
        """This worker's slice as one `[shard]` vector (zeros past the last leaf)."""
        pieces = [x.astype(ms.float32) for x in local]
        held = sum(b - a for _, a, b in self.segments)
        if held < self.shard:
            pieces.append(ops.zeros((self.shard - held,), ms.float32))
        return ops.concat(pieces)

    def _unshard(self, flat: Tensor) -> list[Tensor]:
        """`[world_size * shard]` gathered slices -> the leaves, shaped."""
        flat = flat.reshape(-1)[:sum(self._sizes)]
        return [x.reshape(shape) for x, shape in zip(ops.split(flat, self._sizes), self._shapes)]

    # ---------------------------------------------------------------------------- on the host

    def sum_host(self, value: float) -> float:
        """`value` summed over the workers (eager AllReduce; every worker must call it)."""
        return float(self._all_reduce(Tensor(np.array([value], np.float32))).asnumpy()[0])

    def barrier(self) -> None:
        """Return once every worker has called it."""
        self.sum_host(0.0)

    def shard_state(self, state: Sequence[Tensor], slots: int) -> list[Tensor]:
        """The full optimizer state (`slots` blocks of one tensor per leaf) -> this worker's part."""
        if not self.sharded:
            return list(state)
        n = len(self._sizes)
        return [Tensor(np.ascontiguousarray(state[s * n + i].asnumpy().reshape(-1)[a:b]))
                for s in range(slots) for i, a, b in self.segments]

    def full_state(self, state: Sequence[Tensor], slots: int) -> list[Tensor]:
        """This worker's optimizer state -> the full state of every leaf (eager AllGather with
        ZeRO-1: every worker must call it)."""
        if not self.sharded:
            return list(state)
        k = len(self.segments)
        full = []
        for s in range(slots):
            gathered = self._all_gather(self._padded(state[s * k:(s + 1) * k]))
            full.extend(self._unshard(gathered))
        return full


def data_parallel(zero_stage: int = 0, bucket_bytes: int = BUCKET_BYTES) -> DataParallel | None:
    """A `DataParallel` over the `msrun` workers (initializing `mindspore.communication`), or None
    in a single process (not started by `msrun`, or one worker).

    Raises:
        ValueError: `zero_stage` not in (0, 1).
    """
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, got {zero_stage!r}")
    rank, size = world()
    return DataParallel(rank, size, zero_stage, bucket_bytes) if size > 1 else None


class MsrunError(RuntimeError):
    """An `msrun` job that failed or timed out; the message ends with the workers' log tails."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for `--master_port`)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tails(log_dir: str | os.PathLike, lines: int = 25) -> str:
    """The last `lines` lines of each `msrun` log in `log_dir` (MindSpore's INFO / WARNING lines left out)."""
    tails = []
    for log in sorted(Path(log_dir).glob("*.log")):
        kept = [line for line in log.read_text(errors="replace").splitlines()
                if not line.startswith(("[INFO]", "[WARNING]"))]
        tails.append(f"--- {log.name}\n" + "\n".join(kept[-lines:]))
    return "\n".join(tails)


def _kill_tagged(tag: str) -> None:
    """SIGKILL every process whose environment holds `MSFX_LAUNCH_ID=tag` (msrun starts each worker in
    a session of its own, so killing msrun's process group does not reach them)."""
    needle = f"MSFX_LAUNCH_ID={tag}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass  # gone, or another user's


def launch(script: str | os.PathLike, args: Sequence[str] = (), workers: int = 2, *,
           log_dir: str | os.PathLike, timeout: float = 300, env: dict | None = None) -> str:
    """Run `python script *args` under `msrun --worker_num=workers --local_worker_num=workers` on
    127.0.0.1 with a free port; the scheduler and workers are killed when the job ends or times out
    (no stray worker: they carry a unique `MSFX_LAUNCH_ID`). Returns msrun's output.

    Raises:
        MsrunError: msrun exited non-zero (a worker failed or was killed) or ran past `timeout`
            seconds; the message holds the workers' log tails.
    """
    bin_dir = os.path.dirname(sys.executable)  # msrun starts the workers with the `python` on PATH
    tag = uuid.uuid4().hex
    env = {**os.environ, **(env or {}), "MSFX_LAUNCH_ID": tag}
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("GLOG_v", "3")  # MindSpore's INFO and WARNING lines would fill the logs
    command = [os.path.join(bin_dir, "msrun"), f"--worker_num={workers}", f"--local_worker_num={workers}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", f"--log_dir={log_dir}", "--join=True",
               str(script), *map(str, args)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tagged(tag)
        proc.communicate()
        raise MsrunError(f"msrun ran past {timeout} s and was killed\n{log_tails(log_dir)}") from None
    finally:
        _kill_tagged(tag)  # workers that outlived msrun
    if proc.returncode != 0:
        raise MsrunError(f"msrun exited with {proc.returncode}\n{output[-2000:]}\n{log_tails(log_dir)}")
    return output
