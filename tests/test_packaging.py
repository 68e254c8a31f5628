"""The wheel carries what the package reads at run time; the C kernel's cache heals instead of crashing."""

import hashlib
import os
import subprocess
import sys
import warnings
import zipfile

import pytest

from helpers import REPO, env, python

LOAD = "import warnings; warnings.simplefilter('always'); from lightning_zo.core import cpu_kernel; " \
       "lib = cpu_kernel.load(); print('LOADED' if lib is not None else 'NONE')"


def _load_in_subprocess(cache, **extra):
    # A fresh process each time: a library mapped by this process must never have its file changed under it.
    e = env() | {"LIGHTNING_ZO_CACHE": str(cache), "LIGHTNING_ZO_CPU_KERNEL": "1"} | extra
    return subprocess.run([sys.executable, "-c", LOAD], cwd=REPO, env=e, capture_output=True, text=True, timeout=300)


def test_wheel_ships_configs_kernel_source_data_and_the_command(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True, timeout=600, cwd=tmp_path)
    (wheel,) = tmp_path.glob("lightning_zo-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
        metadata = next(z.read(n).decode() for n in names if n.endswith("METADATA"))
    for needed in ("lightning_zo/conf/config.yaml", "lightning_zo/conf/model/tiny.yaml",
                   "lightning_zo/conf/logger/tensorboard.yaml", "lightning_zo/core/cpu_kernel.c",
                   "lightning_zo/recipe/data/sentiment/train.tsv", "lightning_zo/__main__.py"):
        assert needed in names, needed
    # pyproject.toml lists the packages (conf/ is mapped into lightning_zo/conf): none of the checkout's is missing
    shipped = {f"lightning_zo/{p.relative_to(REPO / 'lightning_zo').as_posix()}" for p in
               (REPO / "lightning_zo").rglob("*.py")} | {f"lightning_zo/conf/{p.relative_to(REPO / 'conf').as_posix()}"
                                                         for p in (REPO / "conf").rglob("*.yaml")}
    assert shipped <= names, sorted(shipped - names)
    assert "lightning-zo = lightning_zo.cli:main" in entry_points
    import lightning_zo  # pyproject.toml reads its version from the package: one place, the same number
    assert f"\nVersion: {lightning_zo.__version__}\n" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert any("lightning" in r and "<2.7" in r for r in core)
    assert any(r.startswith("Requires-Dist: transformers>=4.56") for r in core)
    assert not any(name in r for r in core for name in ("gguf", "accelerate", "peft", "tensorboard", "wandb"))
    assert any("gguf" in r and 'extra == "smollm2"' in r for r in requires)


def test_kernel_cache_is_verified_and_a_damaged_copy_is_rebuilt(tmp_path):
    first = _load_in_subprocess(tmp_path)
    assert first.stdout.strip() == "LOADED", first.stderr[-2000:]
    (lib,) = (tmp_path / "kernels").glob("cpu_kernel-*.so")
    recorded = lib.with_suffix(".sha256").read_text().strip()
    assert recorded == hashlib.sha256(lib.read_bytes()).hexdigest()

    # A truncated library (a crash mid-copy, a full disk): mapping it would die of SIGBUS.
    damaged = lib.read_bytes()[:4096]
    lib.with_suffix(".part").write_bytes(damaged)
    os.replace(lib.with_suffix(".part"), lib)
    second = _load_in_subprocess(tmp_path)
    assert second.returncode == 0 and second.stdout.strip() == "LOADED", second.stderr[-2000:]
    assert "damaged" in second.stderr and "rebuilding" in second.stderr
    assert hashlib.sha256(lib.read_bytes()).hexdigest() == recorded  # rebuilt whole
    assert not list((tmp_path / "kernels").glob("*.tmp"))  # no temporary left behind

    third = _load_in_subprocess(tmp_path)  # healed: loads without a warning
    assert third.stdout.strip() == "LOADED" and "damaged" not in third.stderr


@pytest.mark.parametrize("cc,reason", [("/nonexistent/cc", "no C compiler found"), ("false", "false failed")])
def test_no_compiler_falls_back_to_numpy_with_a_reason(cc, reason, tmp_path, monkeypatch):
    from lightning_zo.core import cpu_kernel

    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv("LIGHTNING_ZO_CACHE", str(tmp_path))
    monkeypatch.setenv("LIGHTNING_ZO_CPU_KERNEL", "1")
    cpu_kernel.load.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cpu_kernel.load() is None
        messages = [str(w.message) for w in caught]
        assert any("using torch ops" in m and reason in m for m in messages), messages
    finally:
        cpu_kernel.load.cache_clear()  # later tests load the real kernel again


def test_a_missing_optional_package_names_its_extra_and_a_real_import_bug_is_not_hidden(capsys):
    from lightning_zo.cli import user_errors

    with pytest.raises(SystemExit) as e, user_errors():
        raise ModuleNotFoundError("No module named 'peft'", name="peft")
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == \
        'error: the optional package peft is not installed: pip install "lightning-zo[lora]"'
    with pytest.raises(ModuleNotFoundError), user_errors():  # not optional: a bug, keep the traceback
        raise ModuleNotFoundError("No module named 'lightning_zo.nope'", name="lightning_zo.nope")


def test_a_required_value_left_unset_is_one_line(tmp_path):
    proc = python("-m", "lightning_zo", "model=hf", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: model.name is required (??? in the config): set it on the command line, model.name=..."]
