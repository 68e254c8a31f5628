"""Benchmark the ZO step against a MeZO-style reference, measured in the same run (docs/DESIGN.md §8).

    python -m lightning_zo.bench [--model tiny|smollm2|roberta-large|opt-1.3b|opt-13b] [--device cpu|cuda]
                                 [--machines 1,8,64,512] [--profile]

Prints one JSON line per configuration. Ratios are what to compare across machines; milliseconds are this
machine's. The reference ("mezo_*") is a faithful re-implementation of MeZO's per-parameter reseeded
torch.normal: perturb +eps, forward, -2 eps, forward, +eps (restore), then regenerate again for the update.
The memory floor (`rw_floor_ms`) is one flat read+write pass over as many bytes as theta has. `--profile` also
prints a torch.profiler table of one step after the JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import threading
import time

import torch

from .core.backend import Backend, Terms
from .core.perturbation import PerturbedForward
from .core.update import Updater
from .core.layout import ParamLayout

SIZES = {"tiny": (16, 32), "smollm2": (16, 33), "roberta-large": (64, 128), "opt-1.3b": (16, 256),
         "opt-13b": (16, 256)}


# The GPU figures' architectures (issue 11's table): Hugging Face model type and config.
ARCHITECTURES = {
    "roberta-large": ("roberta", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                      intermediate_size=4096, vocab_size=50265, max_position_embeddings=514)),
    "opt-1.3b": ("opt", dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                             vocab_size=50272, word_embed_proj_dim=2048)),
    "opt-13b": ("opt", dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, ffn_dim=20480,
                            vocab_size=50272, word_embed_proj_dim=5120)),
}


def build(name: str, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """(model on `device`, vocab size): random init for the architecture figures (speed does not depend on the
    weights), allocated and initialised on `device` itself."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    if name in ("tiny", "smollm2"):
        from .recipe import models

        lm = getattr(models, name)()
        return lm.model.to(device=device, dtype=dtype), lm.model.config.vocab_size
    hub = ARCHITECTURES[name]
    config = AutoConfig.for_model(hub[0], **hub[1])
    cls = AutoModelForMaskedLM if hub[0] == "roberta" else AutoModelForCausalLM
    with torch.device("meta"):  # allocated, not initialised: HF's init of 13B parameters on the CPU takes minutes
        model = cls.from_config(config, dtype=dtype)
    # On the device: torch's CPU normal_ runs on one thread (0.33 s per 50M bf16 elements on our 2-core Xeon, with 1
    # or 2 threads: about 86 s for OPT-13B), and no copy of theta to the device follows.
    model = model.to_empty(device=device)
    # to_empty leaves the buffers uninitialised (RoBERTa's token type ids would index out of range) and unties
    # the embeddings: the buffers come from a one-layer model of the same config, and the ties are made again.
    small = cls.from_config(AutoConfig.for_model(hub[0], **{**hub[1], "num_hidden_layers": 1}), dtype=dtype)
    initial = dict(small.named_buffers())
    for key, buffer in model.named_buffers():
        if key not in initial:
            raise RuntimeError(f"bench: no initial value for {name}'s buffer {key}")
        buffer.copy_(initial[key])
    model.tie_weights()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model, config.vocab_size


class PeakMemory:
    """Peak device memory (CUDA) or peak resident set size sampled every ms (CPU) within a `with` block."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak, self._stop = self._rss(), threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()


class Timing(float):
    """Wall milliseconds, with `.cpu`: the process CPU milliseconds (all threads) of the same calls, on the CPU."""

    cpu: float | None = None


def timed(fn, device: torch.device, repeat: int, warmup: bool = True) -> Timing:
    """Median wall milliseconds of `repeat` calls (after one warm-up call unless `warmup` is False).

    On the CPU the median process CPU time (all threads) comes with it (`.cpu`): on a machine shared with other
    jobs it moves far less than wall time (it still includes the OpenMP threads' spin-waits)."""
    return timed_alternating([fn], device, repeat, warmup)[0]


def timed_alternating(fns, device: torch.device, repeat: int, warmup: bool = True) -> list[Timing]:
    """`timed` for several functions called in turn, `repeat` rounds: a ratio of their medians then compares calls
    made under the same conditions (on our shared machines a forward's time drifts by 10 % within a minute)."""
    if warmup:
        for fn in fns:
            fn()
    times, cpu = [[] for _ in fns], [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[i].append((time.perf_counter() - t0) * 1e3)
            cpu[i].append((time.process_time() - c0) * 1e3)
    out = []
    for wall, process in zip(times, cpu):
        t = Timing(sorted(wall)[len(wall) // 2])
        if device.type == "cpu":
            t.cpu = sorted(process)[len(process) // 2]
        out.append(t)
    return out


def mezo_perturb(params, seed: int, scale: float) -> None:
    torch.manual_seed(seed)
    for p in params:
        p.data.add_(torch.normal(0, 1, size=p.shape, device=p.device, dtype=p.dtype), alpha=scale)


MEZO_UPDATE_MAX_N = 64  # the per-parameter torch.normal reference takes ~40 s per 64 machines on our CPUs


def flat_floor(numel: int, dtype: torch.dtype, device: torch.device, repeat: int) -> float:
    """Milliseconds of one read+write pass over `numel` elements in one flat tensor: the memory floor of a pass."""
    flat = torch.ones(numel, dtype=dtype, device=device)
    ms = timed(lambda: flat.mul_(1.0), device, repeat)
    flat = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ms


def profile_table(step, device: torch.device, rows: int = 30) -> str:
    """torch.profiler's table of one call of `step`, the most expensive operators first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def run(name: str, device: torch.device, dtype: torch.dtype, repeat: int, machines: list[int],
        gaussian_machines: list[int], block_bytes: int | None = None, profile: bool = False) -> dict:
    model, vocab = build(name, dtype, device)
    model = model.eval()
    batch, length = SIZES[name]
    ids = torch.randint(0, vocab, (batch, length), device=device)
    layout = ParamLayout(model)
    params = [s.param for s in layout]
    backend = Backend()
    updater = Updater(model, backend)
    hooks = PerturbedForward(model, layout, "rademacher", block_bytes=block_bytes, backend=backend, updater=updater)

    import inspect

    # As in training: a causal LM scores the label word at the last position only.
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    @torch.no_grad()
    def forward():
        return model(input_ids=ids, **keep).logits.float().mean()

    @torch.no_grad()
    def zo_step(distribution="rademacher", fuse=False):
        hooks.distribution = distribution
        with hooks.perturb(1, 1e-3):
            a = float(forward())
        with hooks.perturb(1, -1e-3):
            b = float(forward())
        apply = updater.defer if fuse else updater.apply  # as training
        apply(layout, Terms([1], [-1e-9 * (a - b)], distribution, rounding_seed=2))

    @torch.no_grad()
    def mezo_step():
        mezo_perturb(params, 1, 1e-3)
        a = float(forward())
        mezo_perturb(params, 1, -2e-3)
        b = float(forward())
        mezo_perturb(params, 1, 1e-3)
        mezo_perturb(params, 1, -1e-9 * (a - b))

    forward()  # warm-up: allocator caches, lazy inits
    with PeakMemory(device) as inference:
        forward()
    with PeakMemory(device) as step_mem:
        zo_step()
    # fuse_update: each step's update rides on the next step's first perturbation pass. Its steady state is one fused
    # step after another, so the pending update waits aside while the other calls run (they would apply it).
    def aside(fn):
        def call():
            pending, updater.pending = updater.pending, None
            try:
                fn()
            finally:
                updater.pending = pending
        return call

    fwd_ms, step_ms, fused_ms, gaussian_ms = timed_alternating(
        [aside(forward), aside(zo_step), functools.partial(zo_step, fuse=True),
         aside(functools.partial(zo_step, "gaussian"))], device, repeat)
    updater.flush()
    before = (hooks.materialized, backend.launches, backend.cpu_calls, backend.other_calls)
    with hooks.perturb(1, 1e-3):
        forward()
    per_forward = [b - a for a, b in zip(before, (hooks.materialized, backend.launches, backend.cpu_calls,
                                                 backend.other_calls))]
    table = profile_table(zo_step, device) if profile else None
    mezo_ms = timed(mezo_step, device, max(1, repeat // 2))
    numel = layout.numel
    element = params[0].element_size()
    floor_ms = flat_floor(numel, params[0].dtype, device, repeat)  # one flat read+write, theta's bytes
    largest = max(b.nbytes for b in hooks.blocks)
    out = {"model": name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "dtype": str(dtype).replace("torch.", ""), "params": numel, "batch": batch, "seq_len": length,
           "threads": torch.get_num_threads(), "fwd_ms": round(fwd_ms, 2), "step_ms": round(step_ms, 2),
           "step_over_2fwd": round(step_ms / (2 * fwd_ms), 3),
           **({"cpu_time_step_over_2fwd": round(step_ms.cpu / (2 * fwd_ms.cpu), 3)} if device.type == "cpu" else {}),
           "fused_step_ms": round(fused_ms, 2), "fused_step_over_2fwd": round(fused_ms / (2 * fwd_ms), 3),
           "gaussian_step_over_2fwd": round(gaussian_ms / (2 * fwd_ms), 3),
           "mezo_step_ms": round(mezo_ms, 2),
           "mezo_step_over_2fwd": round(mezo_ms / (2 * fwd_ms), 3), "rw_floor_ms": round(floor_ms, 2),
           "peak_mem_over_inference": round(step_mem.peak / inference.peak, 3),
           # DESIGN I3: the step may exceed inference peak by at most the largest block's parameters.
           "extra_mem_over_largest_block": round((step_mem.peak - inference.peak) / largest, 3),
           "block_bytes": hooks.block_bytes, "largest_block_bytes": largest, "blocks": len(hooks.blocks),
           "hooks": hooks.hooks, "materialized_per_forward": per_forward[0], "launches_per_forward": per_forward[1],
           "cpu_kernel_calls_per_forward": per_forward[2], "other_calls_per_forward": per_forward[3],
           "payload_bytes_per_step": 1, "ddp_grad_bytes_per_step": numel * element}
    for distribution, ns in (("rademacher", machines), ("gaussian", gaussian_machines)):
        for n in ns:
            seeds, coeffs = list(range(n)), [1e-9] * n
            update = functools.partial(updater.apply, layout, Terms(seeds, coeffs, distribution, rounding_seed=2))
            if n < 64:
                ms = timed(update, device, max(1, repeat // 2))
            else:  # one call first (the kernels are warm from the smaller N); one that takes seconds is the figure
                ms = timed(update, device, 1, warmup=False)
                if ms < 1000:  # else the median of more calls, the first one their warm-up
                    ms = timed(update, device, max(1, repeat // 2), warmup=False)
            out[f"update_ms_{distribution}_n{n}"] = round(ms, 2)
            out[f"update_over_floor_{distribution}_n{n}"] = round(ms / floor_ms, 2)
            if ms.cpu is not None:
                out[f"cpu_time_update_over_floor_{distribution}_n{n}"] = round(ms.cpu / floor_ms.cpu, 2)
    # The reference regenerates each machine's z with per-parameter torch.normal (MeZO's way), N times.
    n_ref = min(max(machines), MEZO_UPDATE_MAX_N)
    ms = timed(lambda: [mezo_perturb(params, s, 1e-9) for s in range(n_ref)], device, 1)
    out[f"mezo_update_ms_n{n_ref}"] = round(ms, 2)
    updater.close()
    hooks.remove()
    backend.close()
    if table is not None:
        out["profile"] = table
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_zo.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", choices=sorted(SIZES), help="repeatable; default: tiny and "
                        "smollm2 on CPU, roberta-large and opt-1.3b on CUDA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--machines", default="1,8,64,512", help="N values for the update figures (Rademacher)")
    parser.add_argument("--gaussian-machines", default=None, help="N values for the Gaussian update figures "
                        "(default: as --machines on CUDA, 1,8,64 on CPU, where N = 512 takes minutes)")
    parser.add_argument("--block-mb", type=float, default=None, help="memory budget of one perturbed block in MB "
                        "(default: the largest set of parameters one module owns)")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table of one step")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    models = args.model or (["tiny", "smollm2"] if device.type == "cpu" else ["roberta-large", "opt-1.3b"])
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    machines = [int(n) for n in args.machines.split(",")]
    gaussian = args.gaussian_machines or (args.machines if device.type == "cuda" else "1,8,64")
    gaussian_machines = [int(n) for n in gaussian.split(",")]
    block_bytes = None if args.block_mb is None else int(args.block_mb * 2**20)
    for name in models:
        out = run(name, device, dtype, args.repeat, machines, gaussian_machines, block_bytes, args.profile)
        table = out.pop("profile", None)
        print(json.dumps(out), flush=True)
        if table is not None:
            print(f"# torch.profiler, one step of {name}\n{table}", flush=True)


if __name__ == "__main__":
    main()
