"""A LightningModule of a user's own (not ZOClassifier): a tiny Llama with a plain next-token loss, trained with
`Trainer(strategy="zo")` and lightning_zo's callbacks. Run as a script by tests/test_bundle.py:

    python tests/plain_module.py RUN_DIR [--devices N] [--max-steps N] [--manual] [--scheduler] [--lora] ...
        [--loader stream|plain|random|stateful|stateful_shuffle|unseeded|distributed]
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler

import lightning_zo
from lightning_zo import ZOOptimizer
from lightning_zo.core.errors import UserError
from lightning_zo.recipe.data import ShardStream

VOCAB, LENGTH, EXAMPLES = 64, 12, 96


def build_model(seed: int = 0, dropout: float = 0.0, lora: bool = False, hf_dir: str | None = None):
    """The base model: what `python -m lightning_zo.replay RUN_DIR --model plain_module:build_model` rebuilds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if hf_dir is not None:
        model = LlamaForCausalLM.from_pretrained(hf_dir)
    else:
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64,
                             attention_dropout=dropout, tie_word_embeddings=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
            if dropout:  # a dropout module in the path, as encoder models have
                model.model.embed_tokens = torch.nn.Sequential(model.model.embed_tokens, torch.nn.Dropout(dropout))
    if lora:
        from lightning_zo.recipe.adapters import lora as add_lora

        model = add_lora(model, r=2, alpha=4.0, targets=["q_proj", "v_proj"], seed=seed)
    return model


def build_lora_model():
    return build_model(lora=True)


class NextToken(pl.LightningModule):
    def __init__(self, manual: bool = False, scheduler: bool = False, lr: float = 1e-3, k: int = 1,
                 dropout: float = 0.0, lora: bool = False, hf_dir: str | None = None, optimizer: str = "zo",
                 loader: str = "stream", steps_per_batch: int = 1):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = not manual
        self.model = build_model(dropout=dropout, lora=lora, hf_dir=hf_dir)
        g = torch.Generator().manual_seed(1)
        self.data = torch.randint(0, VOCAB, (EXAMPLES, LENGTH), generator=g)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            loss = self.loss(batch)
            self.log("train/loss", loss)
            return loss
        opt = self.optimizers()
        if self.hparams.k == 0:  # a module that forgets the loss: the error must say what to do
            opt.step()
            return None
        chunks = batch.chunk(self.hparams.k)
        for _ in range(self.hparams.steps_per_batch):
            opt.step(loss_fn=lambda j: self.loss(chunks[j]))
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return None

    def train_dataloader(self):
        kind = self.hparams.loader
        if kind == "stream":  # the recipe's endless sampler
            sampler = ShardStream(EXAMPLES, self.global_rank, self.trainer.world_size, 8, seed=0)
            return DataLoader(self.data, batch_size=8, sampler=sampler)
        if kind == "random":  # a seeded shuffle of one's own, epoch after epoch from one generator
            return DataLoader(self.data, batch_size=8, sampler=RandomSampler(self.data,
                                                                             generator=torch.Generator().manual_seed(3)))
        if kind == "stateful":  # torchdata's StatefulDataLoader (in order; Lightning's DistributedSampler shards it)
            from torchdata.stateful_dataloader import StatefulDataLoader

            return StatefulDataLoader(self.data, batch_size=8)
        if kind == "stateful_shuffle":  # torchdata's own shuffle, from the DataLoader's generator (its iterators draw
            from torchdata.stateful_dataloader import StatefulDataLoader  # from it too): only its state repeats it

            return StatefulDataLoader(self.data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(5))
        if kind == "unseeded":
            return DataLoader(self.data, batch_size=8, shuffle=True)
        # plain: in order; distributed: shuffled, and Lightning swaps in its DistributedSampler (seed 0, set_epoch)
        return DataLoader(self.data, batch_size=8, shuffle=kind == "distributed")

    def configure_optimizers(self):
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.1)
        opt = ZOOptimizer(self.model, lr=self.hparams.lr, eps=1e-3, k=max(self.hparams.k, 1), seed=5)
        if not self.hparams.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=40)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="zo")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--manual", action="store_true")
    parser.add_argument("--scheduler", action="store_true")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--hf-dir", default=None)
    parser.add_argument("--optimizer", default="zo")
    parser.add_argument("--loader", default="stream", choices=["stream", "plain", "random", "stateful",
                                                               "stateful_shuffle", "unseeded", "distributed"])
    parser.add_argument("--steps-per-batch", type=int, default=1)
    args = parser.parse_args(argv)
    module = NextToken(manual=args.manual, scheduler=args.scheduler, k=args.k, dropout=args.dropout, lora=args.lora,
                       hf_dir=args.hf_dir, optimizer=args.optimizer, loader=args.loader,
                       steps_per_batch=args.steps_per_batch)
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, strategy=args.strategy, max_steps=args.max_steps,
                         default_root_dir=args.run_dir, logger=False, enable_checkpointing=False,
                         use_distributed_sampler=args.loader in ("distributed", "stateful"),
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[lightning_zo.TrajectoryLog(), lightning_zo.RunSummary()])
    previous = signal.getsignal(signal.SIGTERM)
    logger = logging.getLogger("lightning_zo")
    handlers, level = list(logger.handlers), logger.level
    trainer.fit(module)
    # What the strategy changed in Lightning and in the process, and the optimizer's hooks on the model, are undone
    # once fit returns.
    left = [name for name in ("_broadcast_sigterm_tensor",) if name in vars(trainer.fit_loop.epoch_loop)]
    left += [name for name in ("_sigterm_notifier_fn",) if name in vars(trainer._signal_connector)]
    left += ["SIGTERM handler"] if signal.getsignal(signal.SIGTERM) is not previous else []
    left += [f"hooks on {name or 'the model'}" for name, m in module.named_modules()
             if m._forward_pre_hooks or m._forward_hooks or m._state_dict_pre_hooks or m._load_state_dict_pre_hooks]
    left += ["global forward hooks"] if torch.nn.modules.module._global_forward_pre_hooks else []
    left += ["the package logger's handlers or level"] if (logger.handlers, logger.level) != (handlers, level) else []
    print(f"patches left after fit: {left}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # what a user's script sees: the message, one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
