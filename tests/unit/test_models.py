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


@pytest.mark.parametrize("content, says", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "base_model_name_or_path"),
    ('{"r": 8}', "base_model_name_or_path"),
    ('{"base_model_name_or_path": 7}', "base_model_name_or_path"),
    ('{"base_model_name_or_path": ""}', "base_model_name_or_path"),
])
def test_broken_adapter_config_is_a_model_error_naming_the_file(tmp_path, content, says):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(content)
    with pytest.raises(ModelError, match=says) as err:
        resolve(str(adapter))
    assert str(adapter / "adapter_config.json") in str(err.value)


def test_cli_reports_a_broken_adapter_in_one_line(tmp_path, prompts_file):
    """The user-facing contract: exit 2, one line naming the file, no traceback, no run dir."""
    import subprocess
    import sys

    from tests.conftest import REPO, write_recipe

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{not json")
    recipe = write_recipe(tmp_path / "r.yaml", str(adapter), prompts_file)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(recipe), "--run-dir", str(tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert str(adapter / "adapter_config.json") in proc.stderr
    assert not (tmp_path / "run").exists()
