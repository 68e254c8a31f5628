import inspect
import os
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py for subprocesses and spawned ranks


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> Path:
    """A directory with <task>/train.tsv for every task that reads a data directory (tests/task_files.py)."""
    from task_files import write_task_data

    return write_task_data(tmp_path_factory.mktemp("task_data"))


@pytest.fixture
def tiny_lm():
    from lightning_zo.recipe.models import tiny

    return tiny()


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(Path(__file__).parent)]))


# A test that starts training processes (through these helpers, a launcher or SLURM) is slow.
_STARTS_PROCESSES = re.compile(r"\b(train|fit|python|_two_nodes|sbatch|subprocess\.(run|Popen)|Popen)\(")


def pytest_collection_modifyitems(config, items):
    for item in items:
        function = getattr(item, "function", None)
        try:
            source = inspect.getsource(function) if function is not None else ""
        except (OSError, TypeError):
            source = ""
        if _STARTS_PROCESSES.search(source) or item.module.__name__ == "test_slurm":
            item.add_marker(pytest.mark.slow)
        if item.module.__name__ == "test_slurm":
            item.add_marker(pytest.mark.xdist_group("slurm"))  # one local cluster: its jobs run one at a time
    # The longest units first (measured on 2 cores: the SLURM group about 250 s, one after another on one worker;
    # the Triton interpreter's run of every case about 200 s): started last, either kept one worker busy for
    # minutes while the other had nothing left. A stable sort, the same on every xdist worker.
    items.sort(key=lambda item: item.module.__name__ != "test_slurm"
               and item.name != "test_interpreter_matches_cpu_reference")
