"""A CSV logger that a resumed run appends to (Lightning's CSVLogger deletes an existing metrics.csv)."""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        """Keep what an earlier part of this run wrote, and its columns."""
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that rerunning a run's command (a resume from the trajectory log) appends to
    its metrics.csv instead of replacing it, and a refused start leaves it as it was."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    def keep_steps_before(self, steps: int) -> None:
        """A resume from a trajectory log of `steps` steps: drop the rows of later steps (written before a kill,
        while their record had not reached the log yet); the resumed run logs those steps again, as they were."""
        path = os.path.join(self.log_dir, ExperimentWriter.NAME_METRICS_FILE)
        if not self._fs.isfile(path):
            return
        with self._fs.open(path, "r", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        # A row with a missing field is one a kill -9 cut short (csv reads its missing fields as None).
        kept = [row for row in rows if None not in row.values()
                and (not row.get("step", "").isdigit() or int(row["step"]) < steps)]
        # Columns only the dropped rows had (a validation of a stopped start) go too: the uninterrupted run has a
        # column once a row of it has a value, and so does the resumed one when it logs that metric again.
        columns = [c for c in reader.fieldnames or [] if any(row.get(c) not in ("", None) for row in kept)]
        if len(kept) == len(rows) and columns == reader.fieldnames:
            return
        tmp = f"{path}.{os.getpid()}"
        with self._fs.open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        self._fs.mv(tmp, path)
        if self._experiment is not None:  # a writer that read the old header would write its columns back
            self._experiment.metrics_keys = sorted(columns)
