"""ZOStrategy: DDP's process groups, launchers and cluster environments, without DDP's gradient traffic.

Per training step the only collective is one all_reduce(SUM) of the codec payload (int8[world_size * k]): rank r
writes its codes into its own slots of a zeroed tensor, so the sum is exactly every rank's codes. Lightning's
per-batch SIGTERM broadcast is removed; a SIGTERM instead makes this rank send the STOP code, and every rank stops
after that same step (DESIGN I2).
"""

from __future__ import annotations

import logging
import signal
from typing import Any, Callable

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from typing_extensions import override

from ..core.layout import weights_digest
from ..core.optimizer import ZOOptimizer

log = logging.getLogger(__name__)


class ZOStrategy(DDPStrategy):
    strategy_name = "zo"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_requested = False
        self.exchanges = 0  # training steps exchanged by this process
        self.payload_bytes = 0  # size of every exchanged payload tensor (the all_reduce), summed
        self._previous_sigterm: Any = None

    @override
    def configure_ddp(self) -> None:
        """No DistributedDataParallel wrapper: there are no gradients to reduce."""

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        super().setup(trainer)
        self.verify_identical_weights()
        for opt in self.optimizers:
            if isinstance(opt, ZOOptimizer):
                opt.attach(self.global_rank, self.world_size, self.exchange)

    def verify_identical_weights(self) -> None:
        """One all_reduce at setup: without DDP nothing broadcasts rank 0's weights, so they must already agree."""
        if self.world_size == 1:
            return
        digest = int(weights_digest(self.lightning_module)[:15], 16)  # 60 bits: fits int64
        both = torch.tensor([digest, -digest], dtype=torch.int64, device=self.wire_device())
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        if int(both[0]) != -int(both[1]):
            raise RuntimeError(
                f"ranks start from different weights (rank {self.global_rank} has digest {digest:015x}); "
                "every rank must load the same base model (same files, dtype and seed)")

    def wire_device(self) -> torch.device:
        """Where collective tensors must live: the GPU for nccl, the CPU for gloo."""
        return self.root_device if dist.get_backend() == "nccl" else torch.device("cpu")

    def exchange(self, payload: torch.Tensor) -> torch.Tensor:
        """The step's one collective. A stopping rank overwrites its own slots with the STOP code."""
        opt = self.optimizers[0]
        if self.stop_requested:
            own = slice(self.global_rank * opt.k, (self.global_rank + 1) * opt.k)
            payload[own] = opt.codec.stop
        self.exchanges += 1
        self.payload_bytes += payload.numel() * payload.element_size()
        if self.world_size == 1:
            return payload
        wire = payload.to(self.wire_device())
        dist.all_reduce(wire, op=dist.ReduceOp.SUM)
        return wire.cpu()

    @override
    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        zo = getattr(optimizer, "optimizer", optimizer)
        if isinstance(zo, ZOOptimizer) and zo.last_record is not None and zo.last_record.stop:
            log.warning("rank %d: a rank is stopping (SIGTERM); all ranks stop after step %d",
                        self.global_rank, zo.last_record.step)
            self.lightning_module.trainer.should_stop = True
        return out

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        trainer = self.lightning_module.trainer
        # Lightning >= 2.5.2 broadcasts an int64 SIGTERM flag before every training batch and from its signal
        # handler; both are collectives outside our one int8 exchange. Replace them with the STOP code.
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None
        self._previous_sigterm = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("rank %d received SIGTERM: sending STOP with the next step's codes", self.global_rank)
        self.stop_requested = True

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        entries = (("zo", "popen", "torchrun, SLURM and the plain CLI"),
                   ("zo_spawn", "spawn", "tests and local Hydra sweeps"))
        for name, start_method, use in entries:
            if name not in strategy_registry:
                strategy_registry.register(name, cls, description=f"ZO strategy, '{start_method}' launcher ({use})",
                                           start_method=start_method)


ZOStrategy.register_strategies(StrategyRegistry)
