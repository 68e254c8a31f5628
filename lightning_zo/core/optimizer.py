"""ZOOptimizer: the seeded two-forward SPSA step (DESIGN §1), as a torch Optimizer.

`step(closure)` (torch's contract: the closure re-evaluates the model and returns the loss) or
`step(loss_fn=...)` (the loss of micro-batch j, for k perturbations per step) perturbs, evaluates, encodes,
exchanges, decodes and updates. The exchange is an attribute the strategy sets (one int8 all_reduce); alone it is
the identity, so the optimizer runs in plain PyTorch as well as under ZOStrategy.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .aggregation import Aggregation, validate as validate_aggregation
from .codecs import Codec, LinearCodec, check_received, is_stop
from .backend import Backend, Terms
from .layout import ParamLayout
from .masks import SparseMasks, validate as validate_masks
from .perturbation import PerturbedForward
from .errors import UserError
from .noise import DISTRIBUTIONS, GENERATOR_VERSION, GROUP
from .philox import ROUNDING_STREAM, derive_seed
from .population import normalise, validate as validate_population
from .rules import UpdateRule, validate as validate_rule
from .update import Updater

NORMS = ("mean", "sqrt")
# two_sided: (f(theta + eps z) - f(theta - eps z)) / 2 eps, 2k forwards per rank and step (the paper's estimate);
# one_sided: (f(theta + eps z_j) - f(theta)) / eps around one shared unperturbed forward, k + 1 (FZOO, issue 44)
ESTIMATORS = ("two_sided", "one_sided")


@dataclass
class StepRecord:
    """What one step did: enough, with the run seed, to replay it (DESIGN I4)."""

    step: int
    world_size: int
    k: int
    lr: float
    codes: list  # the whole exchanged payload, slot order
    local_losses: list = field(default_factory=list)  # (loss+, loss-) per own slot; one_sided: (loss+, f(theta))
    local_grads: list = field(default_factory=list)
    stop: bool = False  # a rank sent STOP: this step is not applied (a resumed run redoes it with every rank)


_DROPOUT = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
            torch.nn.FeatureAlphaDropout)

LOSS_FN_HELP = ("ZOOptimizer.step needs the loss: in manual optimization call "
                "`opt.step(loss_fn=lambda j: <loss of micro-batch j>)` (or `opt.step(closure)` with a closure that "
                "returns the loss); in automatic optimization `training_step` must return the loss tensor")


def no_decay(name: str) -> bool:
    """MeZO's rule: no weight decay on biases and normalisation weights."""
    lowered = name.lower()
    return lowered.endswith("bias") or "norm" in lowered or "ln_" in lowered


def validate_hparams(lr=1e-5, eps=1e-3, k=1, distribution="rademacher", norm="mean", weight_decay=0.0,
                     aggregation="mean", trim=0.25, rule="sgd", beta=0.9, history=8, beta2=0.99,
                     estimator="two_sided", population="none", mask_keep=1.0, mask_every=100, world_size=None, **_):
    """Raise ValueError for hyperparameters the step cannot use (called early by the CLI, and by __init__);
    `world_size` where known (the CLI's trainer config, the step)."""
    if not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if lr < 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be >= 0, got {lr!r}")
    if int(k) != k or k < 1:
        raise ValueError(f"k (perturbations per rank per step) must be a positive integer, got {k!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    validate_aggregation(aggregation, trim)
    validate_rule(rule, beta, history, beta2)
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    validate_population(population, aggregation, None if world_size is None else world_size * k)
    validate_masks(mask_keep, mask_every)


class ZOOptimizer(torch.optim.Optimizer):
    """The ZO step over `model`'s trainable parameters (requires_grad; freeze the rest, or wrap the model in an
    adapter such as peft's LoRA, to train only part of it).

    Per step and rank: k perturbations z_j = noise(seed(step, rank * k + j)); loss(theta +- eps z_j) from
    `loss_fn(j)` (or the closure), or with `estimator="one_sided"` loss(theta + eps z_j) against one unperturbed loss
    (k + 1 forwards); one code per perturbation through `codec`; after the exchange every rank applies every rank's
    update (its estimates normalised as a population first, if `population` says so: core/population.py), so
    replicas stay bit-identical. The perturbed forwards run with the model in eval mode
    (both must compute one function: no dropout); its modules' modes are restored afterwards.

    `fuse_update=True`: the update waits for the next step's first perturbation, which applies it in the same pass
    over theta (one read of theta less per step, the same bits): weights on CUDA (the Triton kernel, decay and bf16
    rounding included) and fp32 CPU weights without decay (the C kernel); others are updated at once. Until then it
    is pending: a forward of the model or of any of its modules outside a step, `model.state_dict()`,
    `model.load_state_dict()`, `weights_digest`, this optimizer's `state_dict()` and `flush()` apply it first; code
    that reads the parameters directly calls `flush()` first.
    """

    def __init__(self, model: torch.nn.Module, lr: float = 1e-5, eps: float = 1e-3, weight_decay: float = 0.0,
                 k: int = 1, distribution: str = "rademacher", norm: str = "mean", seed: int = 0,
                 codec: Optional[Codec] = None, aggregation: str = "mean", trim: float = 0.25, rule: str = "sgd",
                 beta: float = 0.9, history: int = 8, beta2: float = 0.99, fuse_update: bool = False,
                 estimator: str = "two_sided", population: str = "none", mask_keep: float = 1.0,
                 mask_every: int = 100):
        validate_hparams(lr, eps, k, distribution, norm, weight_decay, aggregation, trim, rule, beta, history, beta2,
                         estimator, population, mask_keep, mask_every)
        layout = ParamLayout(model)
        if layout.numel == 0:
            raise ValueError("the model has no trainable parameters")
        decayed = [s.param for s in layout if not no_decay(s.name)]
        plain = [s.param for s in layout if no_decay(s.name)]
        groups = [g for g in ({"params": decayed, "weight_decay": weight_decay},
                              {"params": plain, "weight_decay": 0.0}) if g["params"]]
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay})
        self.model, self.layout = model, layout
        if any(s.param.dtype == torch.float16 for s in layout):
            warnings.warn("float16 weights are updated with round-to-nearest: updates below half an ulp vanish. "
                          "Use bf16-true (stochastic rounding from the shared generator) or 32-true.", stacklevel=2)
        self.eps, self.k, self.distribution, self.norm = float(eps), int(k), distribution, norm
        self.seed = int(seed)
        self.codec = codec if codec is not None else LinearCodec()
        self.aggregation = Aggregation(aggregation, trim)  # how a step's N*k estimates combine (core/aggregation.py)
        self.rule = UpdateRule(rule, beta, history, beta2)  # how they move the weights, given history (core/rules.py)
        self.estimator, self.population = estimator, population  # how g is measured; how a step's g are normalised
        self.forwards = 0  # per rank, of the applied steps (replayed ones included): the cost axis of issue 44
        # What applies the noise (core/backend.py), the updates (core/update.py) and the perturbed forward
        # (core/perturbation.py): this optimizer's own, closed by `close()`.
        self.masks = SparseMasks(layout, mask_keep, mask_every)  # perturb only small weights (core/masks.py); off at 1
        self.backend = Backend()
        self.updater = Updater(model, self.backend)
        self.perturbed_forward = PerturbedForward(model, layout, distribution, backend=self.backend,
                                                  updater=self.updater,
                                                  mask_of=self.masks.of if self.masks.on else None)
        if self.masks.on:
            self.updater.mask_of = self.masks.of
        self.fuse_update = bool(fuse_update)
        self.closed = False
        self.rank, self.world_size = 0, 1
        self.exchange: Callable[[torch.Tensor], torch.Tensor] = lambda payload: payload
        self.step_count = 0
        self.generator_version = GENERATOR_VERSION  # how sums of several terms associate (noise.term_sum)
        self.last_record: Optional[StepRecord] = None
        self.weight_decay = float(weight_decay)
        self._warned_dropout = False

    def describe(self) -> dict:
        """Everything besides the base weights and the per-step records that replay needs."""
        return {"generator": "philox4x32-10", "generator_version": self.generator_version,
                "distribution": self.distribution, "norm": self.norm, "eps": self.eps,
                "seed": self.seed, "weight_decay": self.weight_decay, "codec": self.codec.config(),
                "aggregation": self.aggregation.config(), "rule": self.rule.config(),
                "estimator": self.estimator, "population": self.population,
                **({"mask": self.masks.describe()} if self.masks.on else {}),
                "payload_dtype": str(self.codec.dtype).replace("torch.", ""), "numel": self.layout.numel,
                "param_dtype": str(self.layout.spans[0].param.dtype).replace("torch.", "")}

    def follow_log(self, header: dict) -> None:
        """Replay or continue the log with this header: its generator version (1 for headers without the key)."""
        self.use_generator_version(header.get("generator_version", 1))

    def use_generator_version(self, version: int) -> None:
        """Version 1 summed all slots left to right; that is version 2's sum for up to 4 slots, so such logs replay
        exactly, and `apply` refuses a step of more slots rather than compute other bits."""
        if version not in (1, GENERATOR_VERSION):
            raise UserError(f"the log was written by generator version {version!r}; this release reads versions 1 "
                            f"and {GENERATOR_VERSION}")
        self.generator_version = version

    def attach(self, rank: int, world_size: int, exchange: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Called by the strategy: who we are and how codes travel."""
        self.rank, self.world_size, self.exchange = rank, world_size, exchange

    def slot_seed(self, step: int, slot: int) -> int:
        return derive_seed(self.seed, step, slot)

    def direction_seed(self, step: int, direction: int) -> int:
        """The seed of an update direction: slot r*k+j's own (`slot_seed`), or direction j's, shared by every rank,
        when the aggregation combines the ranks' estimates of shared directions (trimmed_mean, median, sign_vote)."""
        return derive_seed(self.seed, step, direction, self.aggregation.seed_stream)

    @contextlib.contextmanager
    def _eval_mode(self):
        """The model in eval mode for the perturbed forwards; every module's own mode restored afterwards."""
        modes = [(m, m.training) for m in self.model.modules()]
        if not self._warned_dropout and any(
                training and isinstance(m, _DROPOUT) and m.p > 0 for m, training in modes):
            warnings.warn("ZOOptimizer: the model is in train mode with active dropout; its perturbed forwards run "
                          "in eval mode (loss(theta + eps z) and loss(theta - eps z) must compare one function)",
                          stacklevel=3)
            self._warned_dropout = True
        self.model.eval()
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training

    def _loss(self, loss_fn: Callable[[int], object], j: int) -> float:
        loss = loss_fn(j)
        if loss is None:
            raise TypeError(LOSS_FN_HELP + " (the loss function returned None)")
        return float(loss)

    def forwards_per_step(self, k: int) -> int:
        """Forward passes one rank runs per step of k directions: 2k two-sided, k + 1 one-sided."""
        return k + 1 if self.estimator == "one_sided" else 2 * k

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None, loss_fn: Optional[Callable[[int], torch.Tensor]] = None):
        """One ZO step. `loss_fn(j)` returns the loss of micro-batch j under the current (perturbed) weights.

        Without `loss_fn`, `closure()` is the loss, evaluated on the whole batch for each of the k perturbations
        (torch's closure contract; Lightning's automatic optimization under ZOStrategy). With `loss_fn`, `closure`
        (Lightning's hook closure in manual optimization) runs once, after the exchange and before the update.
        `estimator="one_sided"` compares every direction with one unperturbed `loss_fn(0)`, so `loss_fn(j)` must
        evaluate the same batch for every j (the closure does).
        """
        if loss_fn is None:
            if closure is None:
                raise TypeError(LOSS_FN_HELP)
            evaluate, closure = closure, None
            loss_fn = lambda j: evaluate()  # noqa: E731
        if self.closed:
            raise UserError("this ZOOptimizer was closed (its hooks are off the model); make a new one to train on")
        validate_population(self.population, self.aggregation.name, self.world_size * self.k)
        t, lr = self.step_count, float(self.param_groups[0]["lr"])
        self._refresh_masks(t)
        codec = self.codec
        payload = torch.zeros(self.world_size * self.k, dtype=codec.dtype)
        seeds = [self.direction_seed(t, self.aggregation.direction(self.rank * self.k + j, self.k))
                 for j in range(self.k)]
        one_sided = self.estimator == "one_sided"
        with self._eval_mode():
            if one_sided:
                plus = [self._perturbed_loss(loss_fn, j, seeds[j], self.eps) for j in range(self.k)]
                # after the perturbed forwards: the first of them applied a pending (fused) update on its way
                baseline = self._loss(loss_fn, 0)
                losses = [(loss_plus, baseline) for loss_plus in plus]
            else:
                losses = [(self._perturbed_loss(loss_fn, j, seeds[j], self.eps),
                           self._perturbed_loss(loss_fn, j, seeds[j], -self.eps)) for j in range(self.k)]
        divisor = self.eps if one_sided else 2 * self.eps
        grads = [(a - b) / divisor for a, b in losses]
        for j, g in enumerate(grads):
            slot = self.rank * self.k + j
            if math.isfinite(g):
                payload[slot] = codec.encode(g, t, slot)
            else:
                payload[slot] = codec.skip
                warnings.warn(f"step {t}: non-finite loss on rank {self.rank} slot {slot} "
                              f"(loss+={losses[j][0]}, {'loss0' if one_sided else 'loss-'}="
                              f"{losses[j][1]}); this slot contributes no update", RuntimeWarning, stacklevel=2)
        payload = self.exchange(payload)
        codes = payload.tolist()
        check_received(codec, codes, t)  # a sum outside the codec's range is an error on every rank (DESIGN I7)
        if closure is not None:
            closure()
        record = StepRecord(step=t, world_size=self.world_size, k=self.k, lr=lr, codes=codes,
                            local_losses=losses, local_grads=grads, stop=any(is_stop(codec, c) for c in codes))
        if not record.stop:  # a STOP step changes nothing: resuming redoes it with every rank's estimate (exact)
            self.apply(record)
        self.last_record = record
        if one_sided:
            return torch.tensor(baseline)  # the loss at theta itself
        return torch.tensor(sum(a + b for a, b in losses) / (2 * len(losses)))

    def _perturbed_loss(self, loss_fn: Callable[[int], object], j: int, seed: int, coeff: float) -> float:
        return self.perturbed_forward.evaluate(seed, coeff, lambda: self._loss(loss_fn, j))

    def apply(self, record: StepRecord) -> None:
        """Decode a step's codes and update the weights; advances the codec and the step counter. Used by replay."""
        codec = self.codec
        check_received(codec, record.codes, record.step)
        self._refresh_masks(record.step)
        aggregation = self.aggregation
        estimates = [(self.direction_seed(record.step, direction), value) for direction, value in
                     normalise(self.population, aggregation.estimates(codec, record.codes, record.k))]
        terms = self.rule.terms(estimates, aggregation.scale(len(record.codes), record.k, self.norm), record.lr)
        if self.generator_version == 1 and len(terms) > GROUP:
            raise UserError(f"step {record.step} adds {len(terms)} slots, but its log was written by generator "
                            "version 1 (one left-to-right sum of all slots), which this release reproduces for at "
                            f"most {GROUP}; version {GENERATOR_VERSION} adds them in groups of {GROUP}. Replay or "
                            "continue it with the release that wrote it, or start a new run")
        codec.advance(record.codes)
        decay = {}
        for group in self.param_groups:
            if group["weight_decay"] > 0 and record.lr > 0:
                factor = 1.0 - record.lr * group["weight_decay"]
                decay.update({id(p): factor for p in group["params"]})
        update = Terms([seed for seed, _ in terms], [coefficient for _, coefficient in terms], self.distribution,
                       derive_seed(self.seed, record.step, 0, ROUNDING_STREAM))
        if self.fuse_update:  # applied by the next perturbation's pass, or by flush()
            self.updater.defer(self.layout, update, decay)
        else:
            self.updater.apply(self.layout, update, decay)
        self.step_count = record.step + 1
        self.forwards += self.forwards_per_step(record.k)

    def _refresh_masks(self, step: int) -> None:
        """At a refresh step, the masks from the weights with every earlier update applied (a pending one first)."""
        if self.masks.due(step):
            self.updater.flush()
            self.masks.refresh(step)

    def close(self) -> None:
        """Apply a pending update and take this optimizer's hooks off the model (and its worker threads down):
        the model is the user's own again. A closed optimizer steps no more."""
        self.updater.close()
        self.perturbed_forward.remove()
        self.backend.close()
        self.closed = True

    def flush(self) -> None:
        """Apply a pending update (`fuse_update`) now: the parameters then hold every applied step."""
        self.updater.flush()

    def state_dict(self) -> dict:
        self.flush()  # a checkpoint holds the weights after every step it counts
        state = super().state_dict()
        state["zo"] = {"step_count": self.step_count, "codec": self.codec.state_dict(), "seed": self.seed,
                       "rule": self.rule.config(), "rule_state": self.rule.state_dict(),
                       "forwards": self.forwards, **({"masks": self.masks.state_dict()} if self.masks.on else {})}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        super().load_state_dict(state_dict)
        if zo is not None:
            self.step_count = zo["step_count"]
            self.codec.load_state_dict(zo["codec"])
            self.forwards = zo.get("forwards", self.step_count * self.forwards_per_step(self.k))  # older: as if k
            saved = zo.get("rule", {"name": "sgd"})
            if saved != self.rule.config():
                raise ValueError(f"the checkpoint's update rule {saved} is not this optimizer's {self.rule.config()}")
            if "rule_state" in zo:
                self.rule.load_state_dict(zo["rule_state"])
            if "masks" in zo:
                self.masks.load_state_dict(zo["masks"])
