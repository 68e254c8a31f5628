"""ZOClassifier: prompt classification with label words, trained by manual-optimization ZO steps."""

from __future__ import annotations

import inspect
from functools import partial
from typing import Callable, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics

from ..core.codecs import Codec, LinearCodec
from ..core.optimizer import ZOOptimizer
from .data import label_word_ids


class ZOClassifier(pl.LightningModule):
    """Prompt classification with label words (MeZO / LM-BFF), trained by manual-optimization ZO steps.

    `optimizer` is a partial of ZOOptimizer (Hydra `_partial_: true`); it receives the model and codec. Each training
    step splits the rank's batch into k strided micro-batches, one per perturbation slot. The optimizer runs the
    perturbed forwards in eval mode, so dropout never makes the two forwards compare two functions.
    """

    def __init__(self, model: torch.nn.Module, label_word_ids: list[int], kind: str = "causal",
                 optimizer: Optional[Callable[..., ZOOptimizer]] = None, codec: Optional[Codec] = None,
                 scheduler: Optional[Callable] = None):
        super().__init__()
        self.automatic_optimization = False
        self.model, self.kind = model, kind
        self.register_buffer("label_ids", torch.tensor(label_word_ids), persistent=False)
        self.optimizer_factory = optimizer or partial(ZOOptimizer)
        self.codec = codec or LinearCodec()
        self.scheduler_factory = scheduler
        num_classes = len(label_word_ids)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.eval_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper passes it on
        self._keeps_last_logits = "logits_to_keep" in inspect.signature(base.forward).parameters

    @classmethod
    def for_task(cls, lm, task, **kwargs) -> "ZOClassifier":
        """The recipe's module for a loaded language model (`recipe.models.LanguageModel`) and a `PromptTask`:
        what the `module` config group builds (`_target_: lightning_zo.ZOClassifier.for_task`)."""
        return cls(lm.model, label_word_ids(lm.tokenizer, task.spec.label_words, lm.kind), lm.kind, **kwargs)

    def class_logits(self, batch: dict) -> torch.Tensor:
        """[batch, classes]: the label words' logits at the answer position."""
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

    def loss(self, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self.class_logits(batch), batch["labels"])

    @staticmethod
    def micro_batches(batch: dict, k: int) -> list[dict]:
        """Strided split: chunk j = rows j, j+k, ... (what rank j of k would have drawn from the same permutation),
        with the padding columns no row of the chunk needs removed, so its tensors are exactly that rank's batch."""
        if len(batch["labels"]) % k:
            raise ValueError(f"batch size {len(batch['labels'])} is not divisible by k={k}")
        if k == 1:
            return [batch]
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

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt = self.optimizers()
        zo: ZOOptimizer = opt.optimizer
        chunks = self.micro_batches(batch, zo.k)
        loss = opt.step(loss_fn=lambda j: self.loss(chunks[j]))
        record = zo.last_record
        valid = sum(1 for c in record.codes if zo.codec.is_estimate(c))
        # Local metrics only (DESIGN I2): no sync_dist, nothing crosses the wire for logging.
        self.log_dict({"train/loss": loss, "train/projected_grad": torch.tensor(record.local_grads[0]),
                       "train/lr": torch.tensor(record.lr), "train/contributions": torch.tensor(float(valid))},
                      prog_bar=False, on_step=True, on_epoch=False)
        self.log("loss", loss, prog_bar=True, logger=False)
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
        for batch in loader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            metric.update(self.class_logits(batch).argmax(-1), batch["labels"])
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
        optimizer = self.optimizer_factory(self.model, codec=self.codec)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer),
                                                         "interval": "step"}}
