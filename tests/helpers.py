"""Test-only callbacks (loaded into real rank processes through Hydra overrides) and subprocess helpers."""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_object", "barrier",
               "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "broadcast_object_list",
               "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv", "monitored_barrier")


class CollectiveCensus(pl.Callback):
    """Counts every torch.distributed collective per training step (validation windows excluded)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.steps: list[list[dict]] = []
        self.current: list[dict] = []
        self.in_validation = False
        self._originals = {}

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if not self.in_validation:
                t = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("tensor")
                self.current.append({"op": name, "dtype": str(t.dtype) if t is not None else None,
                                     "numel": t.numel() if t is not None else None})
            return fn(*args, **kwargs)
        return counted

    def on_train_start(self, trainer, pl_module):
        for name in COLLECTIVES:
            if hasattr(dist, name):
                self._originals[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self._originals[name]))
        self.current = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(self.current)  # everything since the previous step ended: loop + step + hooks
        self.current = []

    def on_validation_start(self, trainer, pl_module):
        self.in_validation = True

    def on_validation_end(self, trainer, pl_module):
        self.in_validation = False

    def on_train_end(self, trainer, pl_module):
        for name, fn in self._originals.items():
            setattr(dist, name, fn)
        path = Path(self.out_dir) / f"census.rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.steps))


class PoisonLoss(pl.Callback):
    """Makes one rank's forward produce NaN logits during one step."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step, self.handle = rank, step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            def poison(module, args, output):
                output.logits = output.logits * float("nan")
                return output
            self.handle = pl_module.model.register_forward_hook(poison)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    e["TOKENIZERS_PARALLELISM"] = "false"
    e["PYTHONUNBUFFERED"] = "1"
    return e


TINY = ["model=tiny", "trainer.accelerator=cpu", "trainer.val_check_interval=1000", "trainer.enable_progress_bar=false"]


class ForkServer:
    """The client of tests/forkserver.py: runs `python script args...` as a child forked from a server that has
    already imported the training stack (one server per pytest worker, started on first use)."""

    _server: subprocess.Popen | None = None
    _env: dict | None = None

    @staticmethod
    def _comparable(e: dict) -> dict:
        return {k: v for k, v in e.items() if k != "PYTEST_CURRENT_TEST"}

    @classmethod
    def usable(cls, run_env: dict) -> bool:
        """Starts the server (again) where it is not running, or was started with another environment: an import
        may have read any variable (a server costs one import, as much as the plain subprocess it replaces)."""
        if os.environ.get("LIGHTNING_ZO_TEST_FORKSERVER", "1") == "0":
            return False
        running = cls._server is not None and cls._server.poll() is None
        if not running or cls._comparable(run_env) != cls._comparable(cls._env):
            cls._start(run_env)
        return cls._server is not None

    @classmethod
    def _start(cls, run_env: dict) -> None:
        if cls._server is not None:
            cls._server.kill()
            cls._server.wait()
        cls._server, cls._env = None, dict(run_env)
        server = subprocess.Popen([sys.executable, str(REPO / "tests" / "forkserver.py")], cwd=REPO, env=run_env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        if cls._reply(server, 120).get("ready"):
            cls._server = server
            atexit.register(server.kill)
        else:
            server.kill()

    @staticmethod
    def _reply(server: subprocess.Popen, timeout: float) -> dict:
        ready, _, _ = select.select([server.stdout], [], [], timeout)
        line = server.stdout.readline() if ready else b""
        return json.loads(line) if line else {}

    @classmethod
    def run(cls, cmd: list[str], cwd: Path, run_env: dict, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as d:
            out, err = Path(d) / "stdout", Path(d) / "stderr"
            request = {"argv": cmd[1:], "cwd": str(cwd), "env": run_env, "stdout": str(out), "stderr": str(err)}
            cls._server.stdin.write(json.dumps(request).encode() + b"\n")
            cls._server.stdin.flush()
            pid = cls._reply(cls._server, 60).get("pid")
            if pid is None:
                raise RuntimeError(f"tests/forkserver.py did not start {cmd[1:]} (exit code {cls._server.poll()})")
            reply = cls._reply(cls._server, timeout)
            if "returncode" not in reply:
                os.killpg(pid, signal.SIGKILL)
                cls._reply(cls._server, 60)
                raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(), err.read_text())
            return subprocess.CompletedProcess(cmd, reply["returncode"], out.read_text(), err.read_text())


def python(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python *args` (a script or -m module) with the tests' environment, its output captured: forked from the
    ForkServer where it can, else a plain subprocess."""
    cmd, run_env = [sys.executable, *args], env()
    if ForkServer.usable(run_env):
        return ForkServer.run(cmd, cwd, run_env, timeout)
    return subprocess.run(cmd, cwd=cwd, env=run_env, capture_output=True, text=True, timeout=timeout)


def train(run_dir: Path, *overrides: str, launcher: list[str] | None = None, timeout: int = 300,
          check: bool = True) -> subprocess.CompletedProcess:
    args = [str(REPO / "train.py"), *TINY, f"hydra.run.dir={run_dir}", *overrides]
    if launcher is None:
        proc = python(*args, timeout=timeout)
    else:
        proc = subprocess.run([*launcher, *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(proc.args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def summaries(run_dir: Path) -> list[dict]:
    files = sorted(Path(run_dir).glob("summary.rank*.json"))
    return [json.loads(f.read_text()) for f in files]


class Diverge(pl.Callback):
    """Corrupts one rank's weights after one step (to exercise ReplicaChecksum)."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.model.parameters()).view(-1)[0] += 1.0


class ForgeCodes(pl.Callback):
    """Makes one rank misbehave on the wire from step `from_step` on: it writes `value` into its own slots before
    every exchange (slot=None: a rank that sends e.g. +126 every step), or into `slot`, another rank's (forging)."""

    def __init__(self, rank: int, value: int, slot: int | None = None, from_step: int = 0):
        self.rank, self.value, self.slot, self.from_step = rank, value, slot, from_step

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank != self.rank:
            return
        opt = trainer.optimizers[0]
        honest = opt.exchange

        def exchange(payload):
            if opt.step_count >= self.from_step:
                if self.slot is None:
                    payload[self.rank * opt.k:(self.rank + 1) * opt.k] = self.value
                else:
                    payload[self.slot] = self.value
            return honest(payload)

        opt.exchange = exchange


class SlowStart(pl.Callback):
    """Holds every rank in its pre-training phase (where replay and the zero-shot evaluation run) for `seconds`,
    printing a marker first, so that a test can signal a rank there."""

    def __init__(self, seconds: float = 6.0):
        self.seconds = seconds

    def on_train_start(self, trainer, pl_module):
        import time

        print(f"slow start rank {trainer.global_rank}", flush=True)
        time.sleep(self.seconds)


class SlowInit(pl.Callback):
    """Holds a rank while the CLI builds the run, before fit and its setup (a callback is built with the model and
    data), printing a marker first, so that a test can signal the rank there."""

    def __init__(self, seconds: float = 6.0):
        import time

        print(f"slow init rank {os.environ.get('RANK', '0')}", flush=True)
        time.sleep(seconds)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (a launcher's worker processes)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def logged_steps(path: Path) -> int:
    """Complete records in a trajectory log (0 while it is missing or being written)."""
    from lightning_zo.core import trajectory

    try:
        return len(trajectory.read(path).records)
    except Exception:
        return 0


def kill_9_when_logged(cmd: list[str], run_dir: Path, steps: int, cwd: Path = REPO) -> int:
    """Start `cmd`, kill -9 it and its workers once `run_dir`'s trajectory log holds `steps` steps (or it ended, or
    120 s passed); returns the steps the log holds then."""
    import contextlib
    import time

    proc = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while logged_steps(run_dir / "trajectory.zot") < steps and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    workers = children(proc.pid)  # torchrun starts each worker in a session of its own: kill -9 them by pid
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    return logged_steps(run_dir / "trajectory.zot")


class NaNLossAt(pl.Callback):
    """Makes the module's loss NaN for one training step on one rank: `at` = [[rank, step], ...] (scripts/chaos.py).
    The optimizer then sends its skip code for that rank's slots; the schedule is fixed, so a run that restarts
    meets the same NaNs at the same steps as an uninterrupted one."""

    def __init__(self, at: list):
        self.at = {(int(rank), int(step)) for rank, step in at}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.global_rank, trainer.global_step) in self.at:
            pl_module.loss = lambda chunk: torch.tensor(float("nan"))  # an instance attribute: the method is back at
            # the batch's end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.__dict__.pop("loss", None)
