"""A Lightning Fabric loop of a user's own, trained with lightning_zo.ZOFabric (tests/test_fabric.py runs it):

    python tests/fabric_loop.py RUN_DIR [--devices N] [--max-steps N]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from torch.utils.data import DataLoader, RandomSampler

from lightning_zo import ZOOptimizer
from lightning_zo.core.errors import UserError
from lightning_zo.integration.fabric import ZOFabric
from lightning_zo.integration.strategy import release_process_group
from plain_module import EXAMPLES, LENGTH, VOCAB, build_model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy="ddp")
    fabric.launch()
    model = build_model().to(fabric.device)  # every rank builds the same weights (checked by ZOFabric)
    opt = ZOOptimizer(model, lr=args.lr, eps=1e-3, seed=5)
    run = ZOFabric(fabric, opt, args.run_dir, settings={"lr": args.lr})
    data = torch.randint(0, VOCAB, (EXAMPLES, LENGTH), generator=torch.Generator().manual_seed(1))
    # Fabric swaps the shuffle for its DistributedSampler (one shard per rank, set_epoch each epoch).
    loader = fabric.setup_dataloaders(DataLoader(data, batch_size=8, sampler=RandomSampler(data)))
    for ids in run.batches(loader, args.max_steps):
        def loss_fn(j, ids=ids):
            logits = model(input_ids=ids).logits
            return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        run.step(loss_fn)
    summary = run.close()
    release_process_group()
    print(f"rank {summary['rank']}: steps {summary['steps']} weights_sha256 {summary['weights_sha256']}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        release_process_group()
        sys.exit(2)
