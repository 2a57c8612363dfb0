import json

import pytest

from alignment.models import ModelError, resolve, with_adapter


def test_embedded_model_resolves_to_cached_safetensors(embedded_dir):
    m = resolve("smollm2-135m")
    assert m.base == str(embedded_dir) and m.adapter is None
    assert (embedded_dir / "model.safetensors").is_file() and (embedded_dir / "tokenizer.json").is_file()


def test_local_model_and_adapter_dirs(tmp_path, tiny_model_dir):
    assert resolve(str(tiny_model_dir)).base == str(tiny_model_dir.resolve())
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir)}))
    m = resolve(str(adapter))
    assert m.base == str(tiny_model_dir.resolve()) and m.adapter == str(adapter.resolve())
    assert with_adapter(resolve(str(tiny_model_dir)), adapter).adapter == str(adapter.resolve())


def test_hub_id_passes_through():
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct").base == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("ref", ["", "./no/such/dir", "/no/such/dir", "not a model", "a/b/c"])
def test_bad_references_are_clear(ref):
    with pytest.raises(ModelError):
        resolve(ref)


def test_dir_without_config(tmp_path):
    with pytest.raises(ModelError, match="neither config.json"):
        resolve(str(tmp_path))
