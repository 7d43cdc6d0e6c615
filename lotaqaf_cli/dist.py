"""Data parallelism over torch.distributed: one process per GPU (or per CPU share), started by torchrun.

    torchrun --nproc_per_node=8 -m lotaqaf_cli train recipe=llama3_mmlu

    init()            join the group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT):
                      NCCL on CUDA (each rank on cuda:LOCAL_RANK), gloo on CPU; a no-op alone
    rank(), world(), main()   this process's place (main: rank 0, the only one that writes files)
    all_reduce_sum(tensors)   sum a list of tensors over the ranks, in place (one flat buffer)
    broadcast(obj)            rank 0's picklable object on every rank
    same_on_all(text, what)   refuse, on every rank, a value (the resolved config) that differs
    solo()                    a block rank 0 runs as if alone (what it makes, it then broadcasts)
    from_main(make)           make() on rank 0, its result (or its error) on every rank
    leave()                   every rank leaves the group together; rank 0 goes on as one process
    watch_launcher()          stop this rank when the launcher that started it is gone
    finish()                  leave the group

What is split and what is replicated: docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import sys
import threading
import time

import torch
import torch.distributed as td

from .errors import LotaqafError


def launched() -> bool:
    """Started by torchrun (or a launcher that sets the same variables), with one rank or more."""
    return "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


class Relayed(LotaqafError):
    """Rank 0's error, raised on the other ranks too so that all of them stop; only rank 0 prints it."""


_SOLO = [False]
_LEFT_AS = [0]   # this process's rank in the group it has left (leave()); 0 while in it or alone


def active() -> bool:
    """In a process group of several ranks (and not inside :func:`solo`)."""
    return not _SOLO[0] and td.is_available() and td.is_initialized()


@contextlib.contextmanager
def solo():
    """Rank 0 alone, for work whose result it then broadcasts: inside, lotaqaf acts as one process."""
    _SOLO[0] = True
    try:
        yield
    finally:
        _SOLO[0] = False


def rank() -> int:
    return td.get_rank() if active() else _LEFT_AS[0]


def world() -> int:
    return td.get_world_size() if active() else 1


def left() -> bool:
    """This process was a rank other than 0 of a group it has left: it takes part in nothing more."""
    return not active() and _LEFT_AS[0] != 0


def main() -> bool:
    return rank() == 0


def init(device_kind: str) -> None:
    """Join the process group torchrun set up; on CUDA, bind this rank to its local GPU."""
    if not launched() or active():
        return
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        td.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
    except (RuntimeError, ValueError) as e:
        raise LotaqafError(f"cannot join the torch.distributed group ({backend}): {str(e).splitlines()[0]}") from None


def finish() -> None:
    if active():
        td.destroy_process_group()


def leave() -> None:
    """Every rank leaves the group at once (a barrier, then the group is destroyed): rank 0 goes on as one
    process, with no collective left that would wait for a rank that has ended; the others keep their rank
    number, so that :func:`main` stays false there, and should end."""
    if not active():
        return
    r = td.get_rank()
    td.barrier()
    td.destroy_process_group()
    _LEFT_AS[0] = r


LAUNCHER_GONE = 1   # this rank's exit code when its launcher died (nobody is left to read it)


def watch_launcher(interval_s: float = 0.5) -> None:
    """Stop this process at once when the process that started it (torchrun's agent) is gone.

    torchrun starts every worker in a session of its own, so a SIGKILL to the launcher (or to its process
    group) does not reach the workers: without this they would go on training, and writing checkpoints,
    after the job was killed. Their files are written to temporary names and renamed, so stopping at any
    point leaves the last complete checkpoint to resume from."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(interval_s)
        print(f"lotaqaf (rank {os.environ.get('RANK', '?')}): the launcher (pid {parent}) is gone: stopping",
              file=sys.stderr, flush=True)
        os._exit(LAUNCHER_GONE)

    threading.Thread(target=watch, name="lotaqaf-launcher-watch", daemon=True).start()


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` over the ranks in place, as one flat buffer (a few all-reduces, not one per tensor).
    With two ranks a sum is a + b on every element, the same on every rank and in any order."""
    if not active() or not tensors:
        return
    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        td.all_reduce(flat, op=td.ReduceOp.SUM)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


def broadcast(obj):
    """Rank 0's ``obj`` (picklable) on every rank."""
    if not active():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    out = [None] * world()
    td.all_gather_object(out, obj)
    return out


def same_on_all(text: str, what: str) -> None:
    """Every rank must hold the same ``text`` (e.g. the resolved config): refused otherwise."""
    if not active():
        return
    digests = gather(hashlib.sha256(text.encode()).hexdigest())
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise (LotaqafError if main() else Relayed)(
            f"{what} differs between ranks (rank {odd[0]} vs rank 0): start every rank with the same command, "
            "recipe and overrides")


def from_main(make):
    """``make()`` on rank 0 alone (as if one process), its result on every rank; an error there
    stops every rank."""
    if not active():
        return make()
    result = error = None
    if main():
        with solo():
            try:
                result = make()
            except LotaqafError as e:
                error = str(e)
                result = None
    result, error = broadcast((result, error))
    if error is not None:
        raise (LotaqafError if main() else Relayed)(error)
    return result


def barrier() -> None:
    if active():
        td.barrier()
