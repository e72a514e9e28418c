"""torch.distributed glue: every attnscope command runs unchanged under `torchrun`.

Nothing here does anything unless torchrun started the process (`WORLD_SIZE` > 1 in the
environment); a plain run never imports torch.distributed through this module.

Under torchrun every rank runs the same code:

- `setup(device)` joins the process group once (NCCL when the device is CUDA, gloo
  otherwise; timeout `ATTNSCOPE_DIST_TIMEOUT` seconds) and returns this rank's device,
  `cuda:{LOCAL_RANK}` on GPUs.
- `shard_positions(n)` gives each rank a disjoint, unpadded share of the images, so
  every image is counted exactly once and uneven shards bias nothing;
  `shard_positions(n, batch_size)` shares out whole batches instead, for statistics that
  depend on which images share a batch (minibatch CKA).
- Generic collectives only, knowing nothing of their callers' data: `all_gather` and
  `broadcast_object` move picklable Python objects (over gloo), `all_reduce_sum` sums a
  tensor (float64 metric sums, gradients, BatchNorm statistics, accuracy counts). What
  the objects mean stays with their owners (e.g. `MetricAccumulator.all_reduce`).
- Work that can fail on one rank only runs inside `step()`. At the end of a step all
  ranks exchange "ok or error message" over a gloo group, so either every rank goes on
  to the next collective or every rank raises `RankFailure` together: no rank waits in
  a collective for a peer that has already given up. Rank 0 prints the message, the
  others exit quietly (see `quiet_on_this_rank`). Loops that run collectives in every
  iteration use `sum_and_agree` instead: one integer all-reduce per iteration, with the
  messages exchanged only when a rank failed. The process-group timeout is the last
  resort for a rank that dies or wedges without raising.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from attnscope.errors import AttnscopeError, ConfigError

if TYPE_CHECKING:
    import torch

ENV_TIMEOUT = "ATTNSCOPE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0

# What setup() decided; module state because a process joins at most one process group.
_STATE: dict[str, Any] = {"device": None, "control": None, "backend": None}


class RankFailure(AttnscopeError):
    """Raised on every rank together when any rank failed; rank 0 shows it, the others stay quiet."""

    def __init__(self, message: str, failed_ranks: Sequence[int]) -> None:
        super().__init__(message)
        self.failed_ranks = list(failed_ranks)


# ---------------------------------------------------------------- who am I


def env_world_size() -> int:
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    return _env_int("RANK", 0)


def env_local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        return default


def launched_by_torchrun() -> bool:
    """True in a worker that torchrun (or another env:// launcher) started with several processes."""
    return env_world_size() > 1 and "MASTER_ADDR" in os.environ


def _dist():
    """torch.distributed when a process group is up, else None (never imports torch itself)."""
    mod = sys.modules.get("torch.distributed")
    if mod is None or not mod.is_available() or not mod.is_initialized():
        return None
    return mod


def is_distributed() -> bool:
    dist = _dist()
    return dist is not None and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank; before `setup` under torchrun, the one torchrun assigned."""
    dist = _dist()
    if dist is not None:
        return dist.get_rank()
    return env_rank() if launched_by_torchrun() else 0


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1


def is_main() -> bool:
    """True on the rank that shows progress and writes files (the only rank outside torchrun)."""
    return rank() == 0


def describe() -> dict[str, Any]:
    """What run.json records about the process layout."""
    if not is_distributed():
        return {}
    return {"distributed": {"world_size": world_size(), "backend": _STATE["backend"]}}


# ---------------------------------------------------------------- setup


def timeout_seconds() -> float:
    raw = os.environ.get(ENV_TIMEOUT, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise AttnscopeError(f"{ENV_TIMEOUT} must be a positive number of seconds, got {raw!r}")
    return value


def setup(device: str = "auto") -> torch.device:
    """This process's device; under torchrun also join the process group (once).

    Outside torchrun this is `models.resolve_device(device)`. Under torchrun `auto` and
    `cuda` mean `cuda:{LOCAL_RANK}`, so each process on a node gets its own GPU.
    """
    from attnscope.models import resolve_device

    if not launched_by_torchrun():
        return resolve_device(device)
    if _STATE["device"] is not None and _dist() is not None:
        return _STATE["device"]
    import torch
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_seconds())
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if wants_cuda and torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    local = env_local_rank()
    if backend == "nccl" and local < torch.cuda.device_count():
        torch.cuda.set_device(local)  # before the first collective: NCCL uses the current device
    if _dist() is None:
        dist.init_process_group(backend, timeout=timeout)
        atexit.register(cleanup)
    backend = dist.get_backend()
    _STATE["backend"] = backend
    # Agreement messages and Python objects travel over gloo, whatever the data backend:
    # they must work even when a rank's CUDA device is the thing that failed.
    _STATE["control"] = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    with step():
        dev = _device_for_local_rank(device, local)
    _STATE["device"] = dev
    return dev


def _device_for_local_rank(device: str, local: int) -> torch.device:
    import torch

    from attnscope.models import resolve_device

    dev = resolve_device(device)
    if dev.type != "cuda":
        return dev
    if device not in ("auto", "cuda") and dev.index not in (None, local):
        raise ConfigError(
            "device", f"must be cuda or auto under torchrun (each process uses cuda:LOCAL_RANK), got {device}"
        )
    count = torch.cuda.device_count()
    if local >= count:
        raise AttnscopeError(
            f"local rank {local} needs cuda:{local} but this node has {count} GPU(s); "
            f"start at most {count} processes per node (torchrun's nproc_per_node)"
        )
    dev = torch.device("cuda", local)
    torch.cuda.set_device(dev)
    return dev


#: How long `cleanup` lets gloo's worker threads finish before the interpreter shuts down.
_DRAIN_SECONDS = 0.2


def cleanup() -> None:
    """Leave the process group (registered with atexit by `setup`).

    A gloo worker thread frees each finished collective's tensors after the caller has
    already returned, and freeing a tensor that Python created takes the GIL. A rank
    that exits right after its last collective can reach interpreter finalization
    first; the thread then dies taking the GIL and the process aborts ("terminate called
    without an active exception", SIGABRT; pytorch/pytorch#179291). Sleeping here, while
    the interpreter is whole, releases the GIL so the thread can finish.
    """
    dist = _dist()
    _STATE.update(device=None, control=None, backend=None)
    if dist is not None:
        time.sleep(_DRAIN_SECONDS)
        with contextlib.suppress(Exception):  # a peer that already died must not turn exit into an error
            dist.destroy_process_group()


# ---------------------------------------------------------------- agreeing on failures


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (just `[obj]` outside torchrun)."""
    if not is_distributed():
        return [obj]
    dist = _dist()
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_STATE["control"])
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0, group=_STATE["control"])
    return box[0]


def _summary(exc: BaseException) -> str:
    if isinstance(exc, AttnscopeError):
        return str(exc)
    return f"{type(exc).__name__}: {exc} (traceback printed by that rank)"


def agree(error: BaseException | None = None) -> None:
    """All ranks learn together whether any rank failed; raise `RankFailure` if one did.

    A rank that failed with a bug (not an AttnscopeError) re-raises its own exception so
    its traceback is kept; every other rank raises `RankFailure` with that rank's message.
    """
    gathered = all_gather(None if error is None else _summary(error))
    failed = [(r, m) for r, m in enumerate(gathered) if m is not None]
    if not failed:
        if error is not None:  # outside torchrun: nothing to agree on
            raise error
        return
    if error is not None and not isinstance(error, AttnscopeError):
        raise error
    first_rank, first = failed[0]
    message = first if first_rank == 0 else f"rank {first_rank}: {first}"
    others = [f"rank {r}: {m}" for r, m in failed[1:] if m != first]
    if others:
        message += "; also " + "; ".join(others[:3]) + (" ..." if len(others) > 3 else "")
    raise RankFailure(message, [r for r, _ in failed]) from error


@contextlib.contextmanager
def step() -> Iterator[None]:
    """Run rank-local work that may fail; afterwards every rank knows whether all succeeded.

    A no-op outside torchrun. KeyboardInterrupt and SystemExit pass straight through:
    torchrun stops the other ranks itself.
    """
    if not is_distributed():
        yield
        return
    try:
        yield
    except Exception as exc:
        agree(exc)
        raise  # unreachable: agree() raises when this rank failed
    agree(None)


def barrier() -> None:
    """Wait until every rank gets here (failures agreed on the way)."""
    agree(None)


def sum_and_agree(count: int, error: BaseException | None = None) -> int:
    """The sum of `count` over every rank; raise `RankFailure` on every rank if any rank failed.

    For loops whose every iteration runs collectives (data-parallel training): one small
    integer all-reduce over the gloo control group per iteration, cheap enough to run per
    batch, where `step()` would pickle messages each time. The messages are exchanged (by
    `agree`) only when some rank reports a failure, so every rank leaves the loop at the
    same iteration instead of waiting in the next collective for a peer that left.
    """
    if not is_distributed():
        if error is not None:
            raise error
        return count
    import torch

    box = torch.tensor([count, 0 if error is None else 1], dtype=torch.int64)
    _dist().all_reduce(box, group=_STATE["control"])
    if int(box[1]):
        agree(error)  # raises on every rank, with the failed rank's message
    return int(box[0])


# ---------------------------------------------------------------- sharding and sums


def shard_positions(n: int, batch_size: int | None = None) -> list[int] | None:
    """This rank's positions in a list of `n` items: `rank, rank + world, ...`, or with
    `batch_size` this rank's whole batches (`batch_shard`).

    Disjoint, no padding (a rank may get one fewer item or batch, or none when world
    exceeds them), so every item is processed exactly once. None outside torchrun: take
    everything.
    """
    if not is_distributed():
        return None
    if batch_size is not None:
        return batch_shard(n, batch_size, rank(), world_size())
    return list(range(rank(), n, world_size()))


def batch_shard(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Positions of batches `rank, rank + world, ...` of the split of `n` items into
    consecutive batches of `batch_size` (the last one may be short), in order.

    Cut again into batches of `batch_size`, a rank's share gives back exactly those
    batches: only the last batch of the list can be short, and it ends whichever share
    holds it. So the ranks' batches together are the single-process batches.
    """
    if batch_size < 1 or not 0 <= rank < world:
        raise AttnscopeError(f"batch_shard: batch size {batch_size}, rank {rank} of {world}")
    starts = range(rank * batch_size, n, world * batch_size)
    return [p for start in starts for p in range(start, min(start + batch_size, n))]


def _data_device() -> torch.device:
    import torch

    if _STATE["backend"] == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over every rank (a new tensor on `tensor`'s device).

    The collective runs on the data backend's device (the GPU with NCCL, the CPU with
    gloo), so a tensor on another device (MPS under gloo) is copied there and back. The
    result is bitwise identical on every rank. Outside torchrun: a copy of `tensor`.
    """
    device = _data_device() if is_distributed() else tensor.device
    out = tensor.detach().to(device, copy=True)
    if is_distributed():
        _dist().all_reduce(out)
    return out.to(tensor.device)


# ---------------------------------------------------------------- CLI support


def quiet_on_this_rank(exc: BaseException) -> bool:
    """True when this rank should exit without printing `exc`, because rank 0 reports it.

    That is a `RankFailure` (every rank holds the same message), or a user error raised
    before the process group existed: those come from the command line, which is the
    same on every rank, so printing it once is enough.
    """
    if env_world_size() <= 1 or env_rank() == 0:
        return False
    if isinstance(exc, RankFailure):
        return True
    return isinstance(exc, AttnscopeError) and _dist() is None


def comm_failure_message(exc: BaseException) -> str | None:
    """A one-line explanation when `exc` is a lost peer or a collective timeout under torchrun."""
    if env_world_size() <= 1:
        return None
    dist = sys.modules.get("torch.distributed")
    text = str(exc)
    is_dist_error = dist is not None and isinstance(exc, getattr(dist, "DistError", ()))
    markers = ("connection closed by peer", "connection reset by peer", "timed out", "timeout", "nccl")
    if not is_dist_error and not any(m in text.lower() for m in markers):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    try:
        limit = f"{timeout_seconds():g}"
    except AttnscopeError:
        limit = os.environ.get(ENV_TIMEOUT, "")
    return (
        f"rank {env_rank()} lost contact with the other ranks ({first[:200]}); the failing rank's "
        f"own message or traceback is above (collective timeout {ENV_TIMEOUT}={limit} s)"
    )
