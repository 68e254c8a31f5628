"""What a start leaves in its run directory besides training output: the lock that makes it the directory's one run,
and the record of its configuration. A start that is refused (a changed lr, k or task; a rerun of a finished run)
leaves every file of the directory as it found it: the lock's pid is put back, and the configuration is written only
once a start is accepted."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import lightning.pytorch as pl

from ..core.errors import UserError


class RunLock:
    """One run per directory: an exclusive lock that the OS drops when the process ends, however it ends. The file
    holds the holder's pid (for the refusal's message); a start that is not `keep()`-ed puts the old pid back."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lightning_zo.lock"
        self._fd: int | None = None
        self._previous: bytes | None = None  # what the file held before this start; None once kept

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{self.path.parent} is in use by another run (pid {holder}); give this run its own "
                            "directory (hydra.run.dir=...) or wait for that one to end") from None
        self._previous = os.pread(fd, 64, 0)
        self._write(fd, str(os.getpid()).encode())
        self._fd = fd

    def keep(self) -> None:
        """This start is accepted: its pid stays in the file."""
        self._previous = None

    def release(self) -> None:
        if self._fd is not None:
            if self._previous is not None:
                self._write(self._fd, self._previous)
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def _write(fd: int, content: bytes) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, content, 0)


class ConfigRecord(pl.Callback):
    """Writes the accepted start's configuration files (`files`: name -> text, e.g. Hydra's config.yaml, hydra.yaml
    and overrides.yaml) into RUN_DIR/`subdir` at train start, which only a start that passed every check reaches
    (the trajectory log refuses at fit start). The first accepted start's files are kept: a later start's changes
    of the run's settings are recorded, with their step, in the trajectory log's header."""

    def __init__(self, files: dict[str, str], run_dir: str, subdir: str = ".hydra"):
        self.files, self.dir = files, Path(run_dir) / subdir

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or any((self.dir / name).exists() for name in self.files):
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, text in self.files.items():
            tmp = self.dir / f".{name}.{os.getpid()}"
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(self.dir / name)  # whole or absent, whenever the process ends
