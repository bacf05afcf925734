"""Configs: YAML sections, overrides, unknown keys and wrong types refused."""

from __future__ import annotations

import pytest

from paser.config import load_config, to_mapping
from paser.errors import ConfigError
from paser.models.config import PruneConfig


def test_defaults_file_and_overrides(tmp_path):
    assert load_config(PruneConfig, None, "prune") == PruneConfig()
    path = tmp_path / "c.yaml"
    path.write_text("prune:\n  ratio: 0.3\n  attn_layers: [2, 6]\n  round_to: 8\n")
    cfg = load_config(PruneConfig, path, "prune", {"ratio": 0.1, "seed": None})
    assert cfg.ratio == 0.1 and cfg.attn_layers == (2, 6) and cfg.round_to == 8 and cfg.seed == 0
    assert to_mapping(cfg)["attn_layers"] == [2, 6]


@pytest.mark.parametrize("text, message", [
    ("prune:\n  ratio: high\n", "prune.ratio: expected a number, got str 'high'"),
    ("prune:\n  importance: grad\n", "prune.importance: 'grad' is not one of ['taylor', 'l2', 'random']"),
    ("prune:\n  attn_layers: 4\n", "prune.attn_layers: expected a list of 2 values"),
    ("prune:\n  seed: true\n", "prune.seed: expected an integer, got bool True"),
    ("prune:\n  ratio: 2.0\n", "ratio must be in [0, 1)"),
    ("prune:\n  colour: red\n", "unknown key(s) ['colour']"),
    ("pruning:\n  ratio: 0.2\n", "unknown section(s) ['pruning']"),
    ("score:\n  batch_size: 4\nprune:\n  ratoi: 1\n", "unknown key(s) ['ratoi']"),
    ("prune: [1, 2\n", "malformed YAML"),
])
def test_bad_configs(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(PruneConfig, path, "prune")
    assert message in str(info.value) and "c.yaml" in str(info.value)


def test_every_stage_config_is_a_known_section_and_recipes_load():
    from pathlib import Path

    from paser.config import SECTIONS
    from paser.selection.configs import STAGE_CONFIGS
    from paser.selection.settings import Settings

    assert tuple(STAGE_CONFIGS) == SECTIONS[:len(STAGE_CONFIGS)]
    root = Path(__file__).resolve().parents[1] / "configs"
    recipes = sorted(root.glob("*.yaml"))
    assert len(recipes) >= 4
    for path in recipes:
        Settings.load(path)
        load_config(PruneConfig, path, "prune")
    default = Settings.load(root / "default.yaml")
    assert default.to_dict() == Settings.load(None).to_dict()  # the file spells out exactly the defaults
