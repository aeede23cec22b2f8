"""Presets as data: the shipped files give exactly the values the editors held as Python dicts before,
and a bad preset file is refused naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from overtone.editors import EDITORS, LoRAConfig, MELOConfig, MEMITConfig, ROMEConfig, WISEConfig
from overtone.editors.presets import PresetError, editor_presets, load_presets, model_shapes
from overtone.objectives import OverToneConfig

# The values as they stood in the modules' dicts (wise.PRESETS, melo.PRESETS and melo._REFERENCE,
# rome.EMBEDDED_LAYERS, memit.EMBEDDED_LAYERS / EMBEDDED_UPDATE_WEIGHTS, memory.PRESET_SHAPES) and the
# editors' overtone_defaults, copied before the dicts were deleted. Types count: a run's config.yaml
# writes 5.0 and 5 differently, and a resumed run refuses a changed config.
WISE = {
    "llama-2-7b": dict(layer=27, lr=1.0, steps=70, alpha=5.0, beta=20.0, gamma=10.0, act_ratio=0.88),
    "llama-3-8b": dict(layer=29, lr=0.9, steps=30, alpha=2.0, beta=20.0, gamma=10.0, act_ratio=0.5),
    "smollm2-135m": dict(layer=25, lr=2.0, steps=35, alpha=5.0, beta=20.0, gamma=10.0, act_ratio=0.88),
}
MELO_REFERENCE = dict(rank=2, alpha=700.0, lr=1e-3, steps=50)
MELO = {
    "llama-2-7b": dict(MELO_REFERENCE, layers=(24, 25), init_radius=60.0),
    "llama-3-8b": dict(MELO_REFERENCE, layers=(24, 25), init_radius=30.0),
    "smollm2-135m": dict(MELO_REFERENCE, layers=(22, 23), init_radius=90.0, steps=25),
}
ROME = {"smollm2-135m": dict(layer=7)}
MEMIT = {"smollm2-135m": dict(layers=(4, 5, 6, 7, 8), mom2_update_weight=1000.0)}
SHAPES = {
    "llama-2-7b": dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                       vocab_size=32000),
    "llama-3-8b": dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                       vocab_size=128256),
    "smollm2-135m": dict(model_type="llama", num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                         vocab_size=49152),
}
OVERTONE = {
    "ft-m": OverToneConfig(lam=0.5, n_sigma=1.0, epsilon=0.01),
    "lora": OverToneConfig(lam=0.1, n_sigma=4.0, epsilon=0.01),
    "wise": OverToneConfig(lam=0.1, n_sigma=1.0, epsilon=0.01),
    "melo": OverToneConfig(lam=0.1, n_sigma=1.0, epsilon=0.01),
    "rome": OverToneConfig(),  # untuned: the objective's own defaults (docs/locate.md)
    "memit": OverToneConfig(),
    "alphaedit": OverToneConfig(),  # untuned (docs/lifelong.md)
    "ultraedit": OverToneConfig(),
}


def typed(values: dict) -> dict:
    """Values with their exact types (and the types inside tuples), so 5 and 5.0 differ."""
    return {k: (type(v), tuple(map(type, v)) if isinstance(v, tuple) else (), v) for k, v in values.items()}


@pytest.mark.parametrize("editor, config_class, expected", [
    ("wise", WISEConfig, WISE), ("melo", MELOConfig, MELO), ("rome", ROMEConfig, ROME), ("memit", MEMITConfig, MEMIT),
])
def test_shipped_presets_equal_the_values_the_code_held(editor, config_class, expected):
    presets = editor_presets(editor, config_class)
    assert {name: typed(dict(p.settings)) for name, p in presets.models.items()} == {
        name: typed(values) for name, values in expected.items()}
    assert all(p.source.strip() for p in presets.models.values())


def test_melo_fallback_is_the_reference_toolkit_values():
    fallback = editor_presets("melo", MELOConfig).fallback
    assert fallback is not None and typed(dict(fallback.settings)) == typed(MELO_REFERENCE)
    assert editor_presets("wise", WISEConfig).fallback is None


def test_model_shapes_and_overtone_defaults():
    assert {name: typed(shape) for name, shape in model_shapes().items()} == {
        name: typed(shape) for name, shape in SHAPES.items()}
    assert {name: cls.overtone_defaults for name, cls in EDITORS.items()} == OVERTONE


def test_loading_is_cached():
    assert editor_presets("wise", WISEConfig) is editor_presets("wise", WISEConfig)


GOOD = """
overtone:
  source: a sweep
  settings: {lam: 0.5, n_sigma: 1.0, epsilon: 0.01}
models:
  smollm2-135m:
    source: measured
    settings: {steps: 4}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lora.yaml"
    path.write_text(text)
    return path


def test_a_good_file_loads(tmp_path):
    presets = load_presets(write(tmp_path, GOOD), LoRAConfig)
    assert presets.models["smollm2-135m"].settings == {"steps": 4}
    assert presets.overtone == OverToneConfig(lam=0.5, n_sigma=1.0, epsilon=0.01)


@pytest.mark.parametrize("text, message", [
    (GOOD.replace("steps: 4", "radius: 4"), r"models\.smollm2-135m\.settings: unknown setting 'radius'.*variant"),
    (GOOD.replace("smollm2-135m", "gpt-5"), r"models: unknown model 'gpt-5'; known: llama-2-7b"),
    (GOOD.replace("lam: 0.5", "lambda: 0.5"), r"overtone\.settings: unknown setting 'lambda'"),
    (GOOD.replace("    source: measured\n", ""), r"models\.smollm2-135m: needs 'source'"),
    (GOOD.replace("steps: 4", "steps: 0"), r"models\.smollm2-135m\.settings: steps: LoRA: steps must be >= 1"),
    (GOOD.replace("steps: 4", "lr: '1e-3'"), r"models\.smollm2-135m\.settings: lr: "),
    (GOOD + "extra: 1\n", r"unknown section 'extra'"),
    ("models: [1, 2]\n", r"models: expected a mapping"),
])
def test_a_bad_file_is_refused_naming_the_file_and_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(PresetError, match=message) as error:
        load_presets(path, LoRAConfig)
    assert str(path) in str(error.value)


def test_the_preset_files_ship_with_the_package():
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert "editors/presets/*.yaml" in pyproject
