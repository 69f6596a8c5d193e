from pathlib import Path

import pytest

from lora_helpers import settings


@pytest.mark.parametrize(
    ("value", "quick"), [("1", True), (" 1 ", True), ("0", False), ("", False)]
)
def test_quick_mode_switch(monkeypatch, value, quick):
    monkeypatch.setenv("LORA_QUICK", value)
    assert settings.is_quick() is quick


def test_folders_follow_the_environment_and_quick_mode(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LORA_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("LORA_QUICK", "0")
    assert settings.data_dir() == tmp_path / "data"
    assert settings.artifacts_dir() == tmp_path / "artifacts"
    monkeypatch.setenv("LORA_QUICK", "1")
    assert settings.artifacts_dir() == tmp_path / "artifacts" / "quick"
    assert settings.artifacts_dir().is_dir()


def test_project_dir_is_found_from_a_subfolder(monkeypatch):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root / "notebooks")
    assert settings.project_dir() == root


def test_display_path_is_relative_inside_the_project_only(monkeypatch, tmp_path):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    inside = root / "artifacts" / "gpt_base_scratch.safetensors"
    assert settings.display_path(inside) == str(Path("artifacts", "gpt_base_scratch.safetensors"))
    assert settings.display_path(tmp_path / "x.bin") == str((tmp_path / "x.bin").resolve())
