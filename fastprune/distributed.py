"""The pruner under ``torch.distributed``: rank shards and the epoch-end merge of per-sample state.

During an epoch every rank updates the scores of the samples it trains on, locally, with no
communication.  At ``next_epoch()`` (or ``sync()``) one all-reduce (a maximum over int32 words) merges
the epoch's updates: each rank contributes its state for the samples it touched and the smallest int32
elsewhere, so a sample's merged state is its toucher's, bit for bit (float32 values travel as int32 keys
that order like the floats).  Shards are disjoint except for the padding (below), and a padded sample is
scored the same way by both ranks that train it.  Counters that advance with the visit count (the
margin count) are not sent: each rank adds the merged visits' increase.  Class columns are packed several
to a word.  Every rank then computes the same global selection from the same state and seed, and takes its
shard.

Shard rule (as ``DistributedSampler`` with ``drop_last=False``): the global order is padded to a
multiple of the world size by repeating its first entries, and rank ``r`` takes positions
``r, r + K, r + 2K, ...``; every rank gets ``ceil(n / K)`` samples, so every rank runs the same
number of steps (what DDP needs), and the shards cover the selection.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

# Samples merged per all-reduce: bounds the temporary buffer (4 int32 words a sample -> 256 MiB).
MERGE_CHUNK = 1 << 24


def shard(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s part of ``order``: padded to a multiple of ``world_size`` from its start, strided."""
    if world_size == 1:
        return order
    n = order.numel()
    if n == 0:
        return order
    size = -(-n // world_size)
    pad = size * world_size - n
    if pad:
        order = torch.cat([order, order[:pad].repeat(-(-pad // n))[:pad]])
    return order[rank::world_size].clone()


def shard_len(n: int, world_size: int) -> int:
    """Samples each rank trains when ``n`` are selected."""
    return -(-n // world_size)


class Agreement(NamedTuple):
    """What ``Group.agree`` found: whether the ranks agree, the maxima asked for, the bytes sent per rank."""

    same: bool
    maxima: list[int]
    bytes: int


@dataclass
class Group:
    """The process group the pruner communicates over, with this process's place in it."""

    group: object
    rank: int
    world_size: int
    backend: str

    def all_max(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over ranks (in place)."""
        import torch.distributed as dist

        _collective(lambda: dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group))
        return values

    def agree(self, same: Sequence[int], maxima: Sequence[int] = (), device: torch.device | None = None) -> Agreement:
        """One all-reduce (maximum) of int64 words: whether every rank holds the same ``same`` values (each goes as
        ``v`` and ``-v``: the two maxima are ``v`` and ``-v`` only when no rank holds another value), and the
        maxima over ranks of ``maxima``.  Words in order: ``v1, -v1, v2, -v2, ..., maxima``."""
        words = [w for v in same for w in (int(v), -int(v))] + [int(v) for v in maxima]
        out = self.all_max(torch.tensor(words, dtype=torch.int64, device=device)).tolist()
        agreed = all(out[2 * i] == -out[2 * i + 1] for i in range(len(same)))
        return Agreement(agreed, out[2 * len(same):], 8 * len(words))

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (in place)."""
        import torch.distributed as dist

        _collective(lambda: dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self.group))
        return values


class RankFailure(RuntimeError):
    """A collective of the pruner failed: another rank most likely stopped (an error, or a crash)."""


def _collective(call):
    try:
        call()
    except RankFailure:
        raise
    except Exception as e:  # noqa: BLE001 - gloo/NCCL raise RuntimeError, DistBackendError, timeouts...
        raise RankFailure(
            "fastprune: a collective over the process group failed; another rank has probably stopped "
            f"(an exception there, or it never reached this point): {type(e).__name__}: {e}") from e


def resolve(process_group, device: torch.device) -> Group | None:
    """The group to use: ``process_group`` itself, the default group when one is initialised, or
    ``None`` (single process) when torch.distributed is not in use or ``process_group=False``."""
    if process_group is False:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        if process_group is not None:
            raise ValueError("process_group was given but torch.distributed is not initialised "
                             "(call torch.distributed.init_process_group first)")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of process_group")
    backend = str(dist.get_backend(group))
    if world > 1 and device.type == "cpu" and backend == "nccl":
        raise ValueError("the process group uses NCCL, which cannot reduce CPU tensors; keep the pruner's "
                         "state on the GPU (device='cuda') or use a gloo group (process_group=...)")
    return Group(group, rank, world, backend)


def fingerprint(*values) -> int:
    """A 62-bit hash of settings that must agree on every rank."""
    digest = hashlib.sha256(repr(values).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def check_same(group: Group, what: str, value: int, device: torch.device) -> None:
    """Raise on every rank when ``value`` differs between ranks (one small collective)."""
    if not group.agree([value], device=device).same:
        raise ValueError(f"fastprune: {what} differs between ranks; every rank must build the pruner "
                         "with the same arguments (and the same data)")


_INT_MIN = -(1 << 31)  # what a rank contributes for a sample it did not touch


def float_key(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 keys ordered like the floats (-0.0 below +0.0); its own inverse (``key_float``)."""
    b = x.view(torch.int32)
    return torch.where(b < 0, b ^ 0x7FFFFFFF, b)


def key_float(k: torch.Tensor) -> torch.Tensor:
    """The float32 values of ``float_key`` keys, bit for bit."""
    return torch.where(k < 0, k ^ 0x7FFFFFFF, k).view(torch.float32)


def class_bits(num_classes: int) -> int:
    """Bits of one packed class column: its values -1 .. C - 1 travel as 0 .. C."""
    return max(1, int(num_classes).bit_length())


def merge_words(num_floats: int, num_classes: int, num_class_cols: int) -> int:
    """int32 words per sample that ``merge`` hands to the all-reduce."""
    per_word = 31 // class_bits(num_classes)
    return num_floats + 1 + -(-num_class_cols // per_word)


def merge(floats: list[torch.Tensor], visits: torch.Tensor, counters: list[torch.Tensor],
          classes: list[torch.Tensor], num_classes: int, touched: torch.Tensor, group: Group,
          chunk: int = MERGE_CHUNK) -> int:
    """Merge the per-sample state of the samples some rank touched since the last merge (every tensor N,
    updated in place).  Returns the bytes this rank handed to the all-reduces.

    ``floats`` (float32) and ``visits`` (int32, at least 1 on a touched sample) take the touching rank's
    value (where two ranks touched a sample, the larger); ``counters`` (int32) count the same visits as
    ``visits`` from their own start (a restart), so each adds the merged visits' increase; ``classes`` are
    int32 columns with values in -1 .. ``num_classes`` - 1, packed into ``31 // class_bits`` per word.
    Elsewhere every rank already holds the same values and nothing changes.
    """
    n = touched.numel()
    bits = class_bits(num_classes)
    per_word = 31 // bits
    mask = (1 << bits) - 1
    words = merge_words(len(floats), num_classes, len(classes))
    sent = 0
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        untouched = ~touched[lo:hi]
        buf = torch.empty((words, hi - lo), dtype=torch.int32, device=touched.device)
        for k, row in enumerate(floats):
            buf[k].copy_(float_key(row[lo:hi]))
        buf[len(floats)].copy_(visits[lo:hi])
        for w in range(words - len(floats) - 1):
            word = buf[len(floats) + 1 + w]
            word.zero_()
            for j, col in enumerate(classes[w * per_word:(w + 1) * per_word]):
                word.bitwise_or_((col[lo:hi] + 1) << (bits * j))
        buf.masked_fill_(untouched, _INT_MIN)
        group.all_max(buf)
        sent += buf.numel() * buf.element_size()
        merged_visits = buf[len(floats)]
        hit = merged_visits != _INT_MIN
        advance = torch.where(hit, merged_visits - visits[lo:hi], 0)
        for row in counters:
            row[lo:hi] += advance
        visits[lo:hi] = torch.where(hit, merged_visits, visits[lo:hi])
        for k, row in enumerate(floats):
            row[lo:hi] = torch.where(hit, key_float(buf[k]), row[lo:hi])
        for w in range(words - len(floats) - 1):
            word = buf[len(floats) + 1 + w]
            for j, col in enumerate(classes[w * per_word:(w + 1) * per_word]):
                col[lo:hi] = torch.where(hit, ((word >> (bits * j)) & mask) - 1, col[lo:hi])
    return sent


def init_from_env(device: str | None = None) -> tuple[bool, torch.device]:
    """Initialise the default group from torchrun's environment when there is one.

    Returns (whether this call initialised it, this process's device: ``cuda:LOCAL_RANK`` on GPU
    machines).  A single process (no ``WORLD_SIZE`` > 1) is left alone.  A device this machine lacks
    (``cuda`` without a GPU, a misspelt name) is a one-line ``ValueError`` before anything starts.
    """
    import os

    import torch.distributed as dist

    from .devices import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, "device")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1 or dist.is_initialized():
        return False, dev
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return True, dev


@dataclass
class RankError:
    """What a rank of ``run_local`` raised: the exception's type name and its message with the traceback."""

    kind: str
    message: str


def run_local(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 600.0,
              collective_timeout: float = 60.0, threads: int | None = None) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes joined by a process group.

    For tests, benchmarks and trying distributed code on one machine.  ``fn`` must be importable (a module
    level function).  Returns each rank's return value, or a ``RankError`` for a rank that raised (such a
    rank leaves without tearing the group down, as a crashed one would).  Each process uses ``threads``
    torch threads (default: this machine's cores shared out); with ``backend="nccl"`` rank r uses GPU r.
    Ranks still running after ``timeout`` seconds are killed and ``TimeoutError`` is raised.
    """
    import io
    import multiprocessing as mp
    import os
    import queue
    import tempfile

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if not callable(fn):
        raise ValueError(f"fn must be a module-level function, got {type(fn).__name__}")
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="fastprune-ranks-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_entry, args=(fn, rank, world_size, args, store, backend,
                                                       collective_timeout, threads, results))
                 for rank in range(world_size)]
        for p in procs:
            p.start()
        out = {}
        try:
            while len(out) < world_size:
                rank, blob = results.get(timeout=timeout)
                out[rank] = torch.load(io.BytesIO(blob), weights_only=False)
        except queue.Empty:
            missing = sorted(set(range(world_size)) - set(out))
            raise TimeoutError(f"ranks {missing} did not finish within {timeout} s") from None
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    return [out[r] for r in range(world_size)]


def _rank_entry(fn, rank, world_size, args, store, backend, collective_timeout, threads, results):
    import datetime
    import io
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=collective_timeout))
    failed = False
    try:
        value = fn(rank, world_size, *args)
    except Exception as e:  # noqa: BLE001 - handed back to the caller
        value, failed = RankError(type(e).__name__, f"{e}\n{traceback.format_exc()}"), True
    blob = io.BytesIO()
    torch.save(value, blob)  # bytes, not tensors: nothing shared with a process about to exit
    results.put((rank, blob.getvalue()))
    if not failed:
        dist.destroy_process_group()
