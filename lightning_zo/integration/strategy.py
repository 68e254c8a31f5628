"""ZOStrategy: DDP's process groups, launchers and cluster environments, without DDP's gradient traffic.

Per training step the only collective is one all_reduce(SUM) of the codec payload (int8[world_size * k]): rank r
writes its codes into its own slots of a zeroed tensor, so the sum is exactly every rank's codes. Lightning's
per-batch SIGTERM broadcast is removed; a SIGTERM instead makes this rank send the STOP code, and every rank stops
at that same step (DESIGN I2).

Any LightningModule trains under it when `configure_optimizers` returns a `ZOOptimizer`:
- automatic optimization: `training_step` returns the loss; the strategy's backward does nothing (there are no
  gradients) and the optimizer evaluates the closure at theta + eps z and theta - eps z;
- manual optimization: `training_step` calls `opt.step(loss_fn=lambda j: loss of micro-batch j)`, for k > 1.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any, Callable

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from typing_extensions import override

from ..core.codecs import check_received
from ..core.errors import UserError
from ..core.layout import weights_digest
from ..core.optimizer import ZOOptimizer
from .data_position import continue_at, continue_from_state, stateful

log = logging.getLogger(__name__)


def module_settings(trainer: "pl.Trainer", module: "pl.LightningModule") -> dict:
    """The module's and the datamodule's hyperparameters (`save_hyperparameters`), as comparable strings."""
    settings = {}
    for owner, obj in (("module", module), ("data", trainer.datamodule)):
        hparams = getattr(obj, "hparams", None)
        if hparams:
            settings.update({f"{owner}.{k}": repr(v) for k, v in dict(hparams).items()})
    return settings


def release_process_group() -> None:
    """Release torch.distributed's group now that the process's work is done, not in its destructors at interpreter
    exit, where one rank of a 2-rank run (spawned, and once under torchrun) aborted after finishing its work
    ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class StartupSigterm:
    """SIGTERM from the process's start (the CLI installs this first) until fit's setup, where ZOStrategy takes over:
    imports and building the model and data take seconds (about 15 s for the default model), and a cluster's
    preemption then killed the rank (-15, and torchrun's ChildFailedError traceback). The signal is remembered; the
    strategy then stops every rank before the first step, as for a SIGTERM during replay (exit 0, a rerun resumes)."""

    received = False

    @classmethod
    def install(cls) -> None:
        signal.signal(signal.SIGTERM, cls._remember)

    @classmethod
    def _remember(cls, signum, frame) -> None:
        cls.received = True

    @classmethod
    def hand_over(cls) -> None:
        """For a strategy that handles SIGTERM itself (Lightning's own): the default handling from here on, and a
        signal already received ends the process now, in one line."""
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if cls.received:
            log.warning("received SIGTERM while starting: stopped before training; rerun the same command")
            raise SystemExit(0)


def verify_agreement(mine: dict, world_size: int) -> None:
    """One all_gather_object of every rank's `mine` (DESIGN I6): every rank raises the same one-line error naming the
    differing keys and ranks."""
    every: list = [None] * world_size
    dist.all_gather_object(every, mine)
    reference = every[0]
    differing: dict[str, list[int]] = {}
    for rank, other in enumerate(every[1:], start=1):
        for key in sorted(set(reference) | set(other)):
            if reference.get(key) != other.get(key):
                differing.setdefault(key, []).append(rank)
    if differing:
        shown = "; ".join(f"{key}: rank 0 has {reference.get(key)!r}, rank(s) {ranks} differ"
                          + ("" if len(ranks) > 1 else f" ({every[ranks[0]].get(key)!r})")
                          for key, ranks in differing.items())
        raise UserError(f"ranks disagree on the step's settings or base weights: {shown}; every rank must run "
                        "the same command on the same base model")


def wire_device(local: torch.device) -> torch.device:
    """Where the process group's collective tensors live: the process's own GPU for nccl, the CPU for gloo."""
    return local if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_codes(payload: torch.Tensor, opt: ZOOptimizer, rank: int, device: torch.device) -> torch.Tensor:
    """The step's one collective: an all_reduce(SUM) of the int8 payload, in which rank r wrote only its own slots.
    Every rank then checks that its own slots came back as it sent them (DESIGN I7: a peer that writes into another
    rank's slot wraps the int8 sum, e.g. 21 - 128 = -107, or -127, which would read as STOP): an ExchangeError naming
    the step and slot, raised before anything is applied or logged."""
    own = slice(rank * opt.k, (rank + 1) * opt.k)
    sent = payload.clone()  # the all_reduce may work in place (gloo on CPU: .to() returns payload itself)
    wire = payload.to(device)
    dist.all_reduce(wire, op=dist.ReduceOp.SUM)
    received = wire.cpu()
    check_received(opt.codec, received, opt.step_count, sent=sent, own=own)
    return received


class ZOStrategy(DDPStrategy):
    strategy_name = "zo"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_requested = False
        self.exchanges = 0  # training steps exchanged by this process
        self.payload_bytes = 0  # size of every exchanged payload tensor (the all_reduce), summed
        self._restore: list[Callable[[], None]] = []  # undoes what we changed in Lightning, in teardown
        self._data_positioned = False  # the first training loader of a resumed fit is positioned once
        self._load_data_state: Callable[[], None] | None = None  # a stateful loader's, for the epoch's own iterator
        self._exchanges_at_batch: int | None = None
        self._warned_batches = False

    @property
    def zo_optimizer(self) -> ZOOptimizer:
        return self.optimizers[0]

    @override
    def configure_ddp(self) -> None:
        """No DistributedDataParallel wrapper: there are no gradients to reduce."""

    @override
    def setup_distributed(self) -> None:
        """Under torchrun, the process group gets a key space of its own restart attempt. torchrun's workers share
        its rendezvous store across restarts, and torch's env:// store no longer prefixes the attempt (torch 2.13:
        "we create a new TCPStore for every retry"; the shared one is not new): a restarted rank could read a
        peer's address written by the attempt before, whose process is gone (seen: gloo's connectFullMesh refused,
        restart after restart, until torchrun's --max-restarts ran out)."""
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and not dist.is_initialized():
            self.set_world_ranks()
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), self.world_size,
                                  is_master=False, timeout=self._timeout)
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(self._get_process_group_backend(), timeout=self._timeout, rank=self.global_rank,
                                    world_size=self.world_size,
                                    store=dist.PrefixStore(f"lightning_zo/attempt_{attempt}", store))
        super().setup_distributed()  # Lightning's own connection returns at once when the group exists

    @override
    def setup_environment(self) -> None:
        """Our SIGTERM handling starts here, before replay and the zero-shot evaluation, not at the first step."""
        super().setup_environment()
        self._take_over_signals()

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        super().setup(trainer)
        if len(self.optimizers) != 1 or not isinstance(self.optimizers[0], ZOOptimizer):
            got = ", ".join(type(o).__name__ for o in self.optimizers) or "nothing"
            raise UserError(f"strategy='zo' needs configure_optimizers to return one lightning_zo.ZOOptimizer "
                            f"(got {got}): e.g. `return ZOOptimizer(self, lr=1e-5, eps=1e-3)`")
        opt = self.zo_optimizer
        self.verify_agreement(trainer)
        opt.attach(self.global_rank, self.world_size, self.exchange)

    def agreement(self, trainer: "pl.Trainer") -> dict:
        """Everything that determines a step and must be equal on every rank (DESIGN I6)."""
        opt = self.zo_optimizer
        schedulers = [(type(c.scheduler).__name__, c.interval, c.frequency,
                       {k: v for k, v in c.scheduler.state_dict().items() if isinstance(v, (int, float, str, bool))})
                      for c in trainer.lr_scheduler_configs]
        described = {**opt.describe(), "k": opt.k, "lr": [g["lr"] for g in opt.param_groups],
                     "weight_decay_groups": [g["weight_decay"] for g in opt.param_groups],
                     "lr_schedulers": schedulers, "max_steps": trainer.max_steps,
                     "base_weights_sha256": weights_digest(opt.model)}
        return {**described, **module_settings(trainer, self.lightning_module)}

    def verify_agreement(self, trainer: "pl.Trainer") -> None:
        """Without DDP nothing broadcasts rank 0's weights or settings, so they must already agree."""
        if self.world_size > 1:
            verify_agreement(self.agreement(trainer), self.world_size)

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """A resumed run's training data continues at the batch an uninterrupted run would see (data_position.py):
        resumed from the trajectory log, or from a Lightning checkpoint with a loader Lightning does not restore."""
        trainer = self.lightning_module.trainer
        if not trainer.training or self._data_positioned or trainer.global_step == 0:
            return dataloader
        if stateful(dataloader):
            if trainer.ckpt_path is not None:
                return dataloader  # Lightning restores its position from the checkpoint
            for keeper in (c for c in trainer.callbacks if hasattr(c, "data_states")):  # TrajectoryLog
                states = keeper.data_states(trainer)
                kept = states.before(trainer.global_step)
                if kept is not None and set(kept) == {"loader", "generators"}:
                    self._load_data_state = continue_from_state(trainer, dataloader, trainer.global_step, states,
                                                                kept)
                    if trainer.current_epoch == 0:  # the fit loop trains with the iterator its setup makes next
                        self._load_data_state()
                        self._load_data_state = None
                    return dataloader
        return continue_at(trainer, dataloader, trainer.global_step)

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        self._data_positioned = True  # once; a reloaded loader starts its epoch as Lightning says
        if self._load_data_state is not None:  # past epoch 0: before the epoch loop makes its iterator
            self._load_data_state()
            self._load_data_state = None

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """A resume positions the data at one batch per step: say once if a batch did not step exactly once."""
        super().on_train_batch_start(batch, batch_idx)
        steps = None if self._exchanges_at_batch is None else self.exchanges - self._exchanges_at_batch
        if steps not in (None, 1) and not self._warned_batches:
            self._warned_batches = True
            log.warning("a training batch stepped the ZO optimizer %d times; a resumed run positions its data at one "
                        "batch per step, so it would not continue with the batch an uninterrupted run sees", steps)
        self._exchanges_at_batch = self.exchanges

    def exchange(self, payload: torch.Tensor) -> torch.Tensor:
        """The step's one collective (`all_reduce_codes`). A stopping rank overwrites its own slots with STOP."""
        opt = self.zo_optimizer
        if self.stop_requested:
            payload[self.global_rank * opt.k:(self.global_rank + 1) * opt.k] = opt.codec.stop
        self.exchanges += 1
        self.payload_bytes += payload.numel() * payload.element_size()
        if self.world_size == 1:
            return payload
        return all_reduce_codes(payload, opt, self.global_rank, wire_device(self.root_device))

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Nothing to do: the ZO step needs only loss values (automatic optimization and manual_backward)."""
        return closure_loss

    @override
    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        record = self.zo_optimizer.last_record
        if record is not None and record.stop:
            log.warning("rank %d: a rank is stopping (SIGTERM); every rank stops before step %d (not applied: "
                        "rerun the same command to resume exactly)", self.global_rank, record.step)
            self.lightning_module.trainer.should_stop = True
        return out

    def _take_over_signals(self) -> None:
        """Lightning >= 2.5.2 broadcasts an int64 SIGTERM flag before every training batch and from its signal handler
        (a collective no other rank matches when one rank is signalled). Replace both with the STOP code: the
        handler only sets a flag, and the next exchange carries it. Undone in teardown."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        if StartupSigterm.received:  # before setup (imports, building): STOP at the first step, as any SIGTERM
            StartupSigterm.received = False
            self.stop_requested = True
            log.warning("rank %d received SIGTERM while starting: sending STOP with the first step's codes",
                        self.global_rank)

        def restore_sigterm() -> None:
            signal.signal(signal.SIGTERM, previous)
            if trainer is not None:  # Lightning's own teardown, which runs after ours, restores what it found: ours
                trainer._signal_connector._original_handlers[signal.SIGTERM] = previous

        self._restore.append(restore_sigterm)
        if trainer is None:
            return
        # Under SLURM with auto-requeue Lightning also saves a checkpoint from inside its SIGUSR1 handler, mid-step,
        # and requeues the job; a rerun would restore those weights as its "base". SIGUSR1 means STOP here too (the
        # sbatch script requeues a job that stopped by a signal), so the rerun resumes from the trajectory log.
        connector = trainer._signal_connector
        for owner, name, replacement in ((trainer.fit_loop.epoch_loop, "_broadcast_sigterm_tensor", lambda: None),
                                         (connector, "_sigterm_notifier_fn", self._on_sigterm),
                                         (connector, "_slurm_sigusr_handler_fn", self._on_sigterm)):
            setattr(owner, name, replacement)  # an instance attribute shadows the method; deleting it restores
            self._restore.append(lambda owner=owner, name=name: owner.__dict__.pop(name, None))

    def _on_sigterm(self, signum, frame) -> None:
        if self.stop_requested:
            return
        self.stop_requested = True
        log.warning("rank %d received %s: sending STOP with the next step's codes", self.global_rank,
                    signal.Signals(signum).name)
        if self.launcher is not None:  # the popen launcher's children, as Lightning's own handler does
            self.launcher.kill(signum)

    @override
    def teardown(self) -> None:
        if self.optimizers and isinstance(self.optimizers[0], ZOOptimizer):
            self.zo_optimizer.close()  # the model leaves fit with every step applied and none of our hooks
        while self._restore:
            self._restore.pop()()
        super().teardown()
        if self._start_method != "popen":  # a spawned rank's process ends right after fit
            release_process_group()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        entries = (("zo", "popen", "torchrun, SLURM and the plain CLI"),
                   ("zo_spawn", "spawn", "tests and local Hydra sweeps"))
        for name, start_method, use in entries:
            if name not in strategy_registry:
                strategy_registry.register(name, cls, description=f"ZO strategy, '{start_method}' launcher ({use})",
                                           start_method=start_method)


def register() -> None:
    """Makes `Trainer(strategy="zo")` and `"zo_spawn"` known to Lightning (idempotent)."""
    ZOStrategy.register_strategies(StrategyRegistry)


register()  # on load: `import lightning_zo` loads this module as soon as Lightning is loaded
