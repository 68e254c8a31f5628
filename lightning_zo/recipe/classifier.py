"""ZOClassifier: prompt classification with label words, trained by manual-optimization ZO steps."""

from __future__ import annotations

import inspect
import logging
import time
from functools import partial
from typing import Callable, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics

from ..core.codecs import Codec, LinearCodec
from ..core.errors import UserError
from ..core.optimizer import ZOOptimizer
from .data import label_word_ids
from .tasks import OBJECTIVES, MultipleChoiceSpec

log = logging.getLogger("lightning_zo")


def is_zo(factory: Callable) -> bool:
    """Whether an optimizer factory (a class, or a partial of one) builds a ZOOptimizer."""
    func = getattr(factory, "func", factory)
    return isinstance(func, type) and issubclass(func, ZOOptimizer)


class ZOClassifier(pl.LightningModule):
    """Prompt classification with label words (MeZO / LM-BFF), trained by manual-optimization ZO steps.

    `optimizer` is a partial of ZOOptimizer (Hydra `_partial_: true`); it receives the model and codec. Each training
    step splits the rank's batch into k strided micro-batches, one per perturbation slot. The optimizer runs the
    perturbed forwards in eval mode, so dropout never makes the two forwards compare two functions.
    Any other torch optimizer (a partial taking the parameters, e.g. `optimizer=adam`) trains the same module by
    backprop: the first-order reference of issue 15, with the same prompts, examples and evaluation.
    """

    def __init__(self, model: torch.nn.Module, label_word_ids: list[int], kind: str = "causal",
                 optimizer: Optional[Callable[..., ZOOptimizer]] = None, codec: Optional[Codec] = None,
                 scheduler: Optional[Callable] = None, num_choices: Optional[int] = None,
                 objective: str = "cross_entropy"):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r}; choose one of {', '.join(OBJECTIVES)}")
        self.objective = objective
        if objective != "cross_entropy":  # recorded (agreement check, trajectory header) only when not the default
            self.save_hyperparameters({"objective": objective})
        self.automatic_optimization = False
        self.model, self.kind = model, kind
        self.register_buffer("label_ids", torch.tensor(label_word_ids), persistent=False)
        self.optimizer_factory = optimizer or partial(ZOOptimizer)
        self.backprop = not is_zo(self.optimizer_factory)
        if self.backprop and objective != "cross_entropy":
            raise ValueError(f"objective={objective} is not differentiable: train it with the ZO optimizer")
        self.codec = codec or LinearCodec()
        self.scheduler_factory = scheduler
        num_classes = num_choices or len(label_word_ids)  # multiple choice: classes are candidate positions
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.eval_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper passes it on
        self._keeps_last_logits = "logits_to_keep" in inspect.signature(base.forward).parameters

    @classmethod
    def for_task(cls, lm, task, **kwargs) -> "ZOClassifier":
        """The recipe's module for a loaded language model (`recipe.models.LanguageModel`) and a `PromptTask`:
        what the `module` config group builds (`_target_: lightning_zo.ZOClassifier.for_task`)."""
        kwargs.setdefault("objective", getattr(task, "objective", "cross_entropy"))
        if isinstance(task.spec, MultipleChoiceSpec):
            if lm.kind != "causal":
                raise UserError(f"task {task.name} (multiple choice) needs a causal LM (model.kind=causal)")
            return cls(lm.model, [], lm.kind, num_choices=len(task.spec.choice_columns), **kwargs)
        return cls(lm.model, label_word_ids(lm.tokenizer, task.spec.label_words, lm.kind), lm.kind, **kwargs)

    def class_logits(self, batch: dict) -> torch.Tensor:
        """[batch, classes]: the label words' logits at the answer position (multiple choice: the candidates'
        scores, see choice_scores)."""
        if "choice_mask" in batch:
            return self.choice_scores(batch)
        mask = batch["attention_mask"]
        if self.kind == "causal":
            kwargs = {"logits_to_keep": 1} if self._keeps_last_logits else {}
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at 0
            out = self.model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids,
                             use_cache=False, **kwargs)
            logits = out.logits[:, -1, :]
        else:
            out = self.model(input_ids=batch["input_ids"], attention_mask=mask)
            logits = out.logits[torch.arange(len(mask), device=mask.device), batch["mask_pos"]]
        return logits[:, self.label_ids].float()

    def choice_scores(self, batch: dict) -> torch.Tensor:
        """[examples, candidates]: each candidate's mean token log-probability after its prompt (MeZO's length
        normalisation), all rows of the batch (every candidate of every example) in one forward. Only the last
        positions that predict candidate tokens are turned into logits."""
        ids, mask, scored = batch["input_ids"], batch["attention_mask"], batch["choice_mask"]
        n_examples = len(batch["labels"])
        if len(ids) % n_examples:
            raise ValueError(f"{len(ids)} rows are not a whole number of candidates for {n_examples} examples")
        span = int(scored.sum(-1).max())  # candidate tokens sit at the right end (left padding)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs = {"logits_to_keep": span + 1} if self._keeps_last_logits else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False, **kwargs)
        logits = out.logits[:, -(span + 1):-1, :].float()  # position t predicts token t + 1
        targets, weight = ids[:, -span:], scored[:, -span:].float()
        token_logp = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        score = (token_logp * weight).sum(-1) / weight.sum(-1)
        return score.view(n_examples, -1)

    def loss(self, batch: dict) -> torch.Tensor:
        if self.objective == "accuracy":  # non-differentiable: the ZO step only compares two loss values
            logits = self.class_logits(batch)
            return -(logits.argmax(-1) == batch["labels"]).float().mean()
        return F.cross_entropy(self.class_logits(batch), batch["labels"])

    @staticmethod
    def micro_batches(batch: dict, k: int) -> list[dict]:
        """Strided split: chunk j = rows j, j+k, ... (what rank j of k would have drawn from the same permutation),
        with the padding columns no row of the chunk needs removed, so its tensors are exactly that rank's batch."""
        if len(batch["labels"]) % k:
            raise ValueError(f"batch size {len(batch['labels'])} is not divisible by k={k}")
        if k == 1:
            return [batch]
        if "choice_mask" in batch:  # multiple choice: split examples, each with all its candidate rows
            return ZOClassifier._choice_micro_batches(batch, k)
        chunks = []
        for j in range(k):
            chunk = {key: value[j::k] for key, value in batch.items()}
            start = int(chunk["attention_mask"].any(0).int().argmax())  # first column a row of this chunk uses
            chunk["input_ids"] = chunk["input_ids"][:, start:].contiguous()
            chunk["attention_mask"] = chunk["attention_mask"][:, start:].contiguous()
            if "mask_pos" in chunk:
                chunk["mask_pos"] = chunk["mask_pos"] - start
            chunks.append(chunk)
        return chunks

    @staticmethod
    def _choice_micro_batches(batch: dict, k: int) -> list[dict]:
        """Chunk j = examples j, j+k, ... with all their candidate rows (as rank j of k would collate them), padding
        columns no row of the chunk needs removed."""
        n_examples = len(batch["labels"])
        rows = len(batch["input_ids"])
        if rows % n_examples:
            raise ValueError(f"{rows} rows are not a whole number of candidates for {n_examples} examples")
        n = rows // n_examples
        chunks = []
        for j in range(k):
            chunk = {"labels": batch["labels"][j::k]}
            for key in ("input_ids", "attention_mask", "choice_mask"):
                value = batch[key]
                chunk[key] = value.view(n_examples, n, -1)[j::k].reshape(-1, value.shape[-1])
            start = int(chunk["attention_mask"].any(0).int().argmax())
            for key in ("input_ids", "attention_mask", "choice_mask"):
                chunk[key] = chunk[key][:, start:].contiguous()
            chunks.append(chunk)
        return chunks

    def on_fit_start(self) -> None:
        # Hugging Face's from_pretrained returns the model in eval mode; training mode is Lightning's convention
        # (and silences its warning about modules in eval mode). The optimizer runs the perturbed forwards in eval
        # mode itself, and warns if that switches off dropout.
        self.train()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        if self.backprop:
            return self._backprop_step(batch)
        opt = self.optimizers()
        zo: ZOOptimizer = opt.optimizer
        # one_sided compares every direction with one unperturbed forward, so every direction sees the whole batch
        chunks = [batch] * zo.k if zo.estimator == "one_sided" else self.micro_batches(batch, zo.k)
        tokens = []  # what this step's forwards read (padding excluded): the cost beside the forward count

        def loss_fn(j: int) -> torch.Tensor:
            tokens.append(int(chunks[j]["attention_mask"].sum()))
            return self.loss(chunks[j])

        loss = opt.step(loss_fn=loss_fn)
        record = zo.last_record
        valid = sum(1 for c in record.codes if zo.codec.is_estimate(c))
        # Local metrics only (DESIGN I2): no sync_dist, nothing crosses the wire for logging.
        self.log_dict({"train/loss": loss, "train/projected_grad": torch.tensor(record.local_grads[0]),
                       "train/lr": torch.tensor(record.lr), "train/contributions": torch.tensor(float(valid)),
                       "train/tokens": torch.tensor(float(sum(tokens))),
                       "forwards": torch.tensor(float(zo.forwards))},  # this rank's so far: curves against cost
                      prog_bar=False, on_step=True, on_epoch=False)
        self.log("loss", loss, prog_bar=True, logger=False)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def _backprop_step(self, batch: dict) -> None:
        opt = self.optimizers()
        loss = self.loss(batch)
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        self.log_dict({"train/loss": loss.detach(), "train/lr": torch.tensor(float(opt.param_groups[0]["lr"])),
                       "train/tokens": batch["attention_mask"].sum().float(),  # one forward (and a backward) per step
                       "forwards": torch.tensor(float(self.global_step))},  # counted by opt.step()
                      on_step=True, on_epoch=False)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def summary_metrics(self, trainer) -> dict[str, float]:
        """What RunSummary reports before the first step and at the end: validation accuracy (and the evaluation
        file's, if the task has one) over every rank's shard."""
        dm = trainer.datamodule
        metrics = {"val_acc": self.evaluate(dm.val_dataloader(), self.val_acc)}
        if dm.evaluation is not None:
            metrics["eval_acc"] = self.evaluate(dm.test_dataloader(), self.eval_acc)
        return metrics

    @torch.no_grad()
    def evaluate(self, loader, metric: torchmetrics.Metric) -> float:
        """Accuracy over a loader of this rank's shard, synced over ranks by torchmetrics (not a training step)."""
        was_training = self.training
        self.eval()
        metric.reset()
        started = last = time.monotonic()
        for i, batch in enumerate(loader, start=1):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            metric.update(self.class_logits(batch).argmax(-1), batch["labels"])
            if time.monotonic() - last > 30 and self.global_rank == 0:  # long evaluations show that they move
                last = time.monotonic()
                log.info("evaluating: batch %d/%d, %.0f s", i, len(loader), last - started)
        value = float(metric.compute())
        metric.reset()
        self.train(was_training)
        return value

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_acc.update(self.class_logits(batch).argmax(-1), batch["labels"])
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.eval_acc.update(self.class_logits(batch).argmax(-1), batch["labels"])
        self.log("test/acc", self.eval_acc, on_epoch=True)

    def configure_optimizers(self):
        if self.backprop:
            optimizer = self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])
        else:
            optimizer = self.optimizer_factory(self.model, codec=self.codec)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer),
                                                         "interval": "step"}}
