"""Runtime helpers: device and process-group setup, rank/world queries, exact all-reduce, seeding,
gradient norms and preemption signals. Knows nothing of models, data or the training loop."""
from __future__ import annotations

import datetime
import logging
import os
import random
import signal
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# Exit code of a run stopped by SIGTERM/SIGINT after saving a resumable checkpoint (128 + SIGTERM, as
# shells and schedulers report a terminated process). Job scripts requeue on it.
PREEMPTED_EXIT_CODE = 143


@dataclass(frozen=True)
class DistInfo:
    """Where this process runs: device, global rank, world size, local rank."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, '')
    return int(value) if value.strip() else default


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when available else CPU; 'cuda' without a GPU is a clear error."""
    if choice == 'cuda' or (choice == 'auto' and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from config import ConfigError
            raise ConfigError("DEVICE is 'cuda' but no CUDA device is available; use --device cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device('cuda', local_rank)
    return torch.device('cpu')


def _elastic_attempt_store(world: int, timeout: datetime.timedelta) -> Optional[dist.Store]:
    """Under torchrun's agent store (TORCHELASTIC_USE_AGENT_STORE): the agent's TCPStore seen through a prefix
    per worker-group attempt. torchrun keeps that store across ``--max-restarts`` restarts without one, so a
    restarted rank could read the previous attempt's keys (gloo: the dead ranks' addresses, 'Connection
    refused'); torch used to add this prefix itself. None elsewhere (``env://`` as usual)."""
    if os.environ.get('TORCHELASTIC_USE_AGENT_STORE', '').lower() != 'true':
        return None
    base = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), world, is_master=False,
                         timeout=timeout)
    return dist.PrefixStore(f"/worker/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)


def init_distributed(device_choice: str = 'auto', timeout_s: float = 600) -> DistInfo:
    """Set up the device and (when launched with WORLD_SIZE > 1 by torchrun / torch.distributed.launch)
    the default process group: nccl on CUDA, gloo on CPU, with a collective timeout of ``timeout_s``
    seconds so that a dead rank makes the others fail instead of hanging. A plain ``python main.py``
    (no env vars) is a single process without a process group."""
    world = _env_int('WORLD_SIZE', 1)
    rank = _env_int('RANK', 0)
    local_rank = _env_int('LOCAL_RANK', 0)
    device = pick_device(device_choice, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        if backend == 'nccl':
            # errors/timeouts of NCCL collectives abort the process instead of hanging it
            os.environ.setdefault('TORCH_NCCL_ASYNC_ERROR_HANDLING', '1')
        kwargs = {'device_id': device} if backend == 'nccl' else {}
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _elastic_attempt_store(world, timeout)
        if store is not None:
            kwargs['store'] = store
        else:
            kwargs['init_method'] = 'env://'
        dist.init_process_group(backend=backend, world_size=world, rank=rank, timeout=timeout, **kwargs)
    return DistInfo(device=device, rank=rank, world_size=world, local_rank=local_rank)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def release_ddp_reducer(model: torch.nn.Module) -> None:
    """Free a DDP wrapper's reducer while the process group is still registered.

    A reducer that outlives ``destroy_process_group`` holds the group's last reference, and its deallocation
    (GIL held) then destroys the group. Under torch 2.11 with gloo this deadlocks against gloo's worker threads,
    which need the GIL to free their finished work: every 2-rank CPU run hung after its last checkpoint.
    Freed here, the reducer drops one reference of several and the group is destroyed by
    ``destroy_process_group``, which releases the GIL. The model itself is finished with at this point.
    """
    ddp = getattr(model, '_orig_mod', model)                  # under TRAIN.COMPILE: the compiled DDP wrapper
    if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        for name in ('logger', 'reducer'):                   # the logger holds the reducer too
            ddp.__dict__.pop(name, None)


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(values: Sequence[float], device: torch.device) -> List[float]:
    """Exact cross-rank sums of a few scalars (float64), e.g. correct counts and sample counts."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max(values: Sequence[float], device: torch.device) -> List[float]:
    """Cross-rank maxima of a few scalars (flags: any rank asked to stop / saw a non-finite loss)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def derive_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers such as (seed, epoch, step, rank)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def seed_host(seed: int) -> None:
    """Seed python, numpy and torch's CPU RNGs only: for each sample's augmentation, which runs on the host.
    (``torch.manual_seed`` also queues a lazy seed per device backend, each formatting the call stack while
    the backend is not initialised: milliseconds per image.)"""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.default_generator.manual_seed(seed)


def grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: Optional[float] = None) -> torch.Tensor:
    """Total L2 norm of the gradients; clips them to ``max_norm`` when given (None or 0: no clipping)."""
    parameters = list(parameters)
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros((), device=parameters[0].device if parameters else None)
    if max_norm:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


class PreemptionHandler:
    """Turns SIGTERM/SIGINT into a flag that the training loop polls at step boundaries. A second signal
    of the same kind falls back to the default behaviour (immediate stop). Use as a context manager;
    the previous handlers are restored on exit. Only the main thread may install handlers; elsewhere
    this is a no-op flag."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:  # noqa: ANN001
        if self.signum is not None:        # second signal: give up gracefully-stopping
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        logger.warning('received %s: will save a resumable checkpoint at the next step and exit',
                       signal.Signals(signum).name)

    def __enter__(self) -> 'PreemptionHandler':
        try:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        except ValueError:                 # not the main thread
            self._previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous.clear()
