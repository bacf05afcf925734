"""Configs: YAML sections, overrides, unknown keys and wrong types refused."""

from __future__ import annotations

import pytest

from paser.config import config_with, load_config, to_mapping
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

    assert ("prompt", *STAGE_CONFIGS) == SECTIONS[:len(STAGE_CONFIGS) + 1]  # the prompt section, then selection's
    root = Path(__file__).resolve().parents[1] / "configs"
    recipes = sorted(root.glob("*.yaml"))
    assert len(recipes) >= 4
    for path in recipes:
        Settings.load(path)
        load_config(PruneConfig, path, "prune")
    default = Settings.load(root / "default.yaml")
    assert default.to_dict() == Settings.load(None).to_dict()  # the file spells out exactly the defaults


def test_one_prompt_section_serves_scoring_recovery_and_evaluation(tmp_path):
    from paser.data.prompts import PromptFormat
    from paser.evaluation.config import EvalConfig
    from paser.recovery.config import RecoverConfig
    from paser.selection.settings import Settings

    path = tmp_path / "c.yaml"
    path.write_text("prompt:\n  template: chat\n  cutoff: 128\nrecover:\n  epochs: 1\n")
    shared = PromptFormat("chat", 128)
    settings = Settings.load(path)
    assert settings.prompt == settings.score.prompt == shared
    assert load_config(RecoverConfig, path, "recover").prompt == shared
    assert load_config(EvalConfig, path, "evaluate").prompt == shared
    # a command-line option on top, under the section's name; the file's other key stays
    assert load_config(RecoverConfig, path, "recover", {"prompt": {"cutoff": 64, "template": None}}).prompt == \
        PromptFormat("chat", 64)
    # the run folder's settings.json holds it as a section of its own, and reads back the same
    sections = settings.to_dict()
    assert sections["prompt"] == {"template": "chat", "cutoff": 128} and "prompt" not in sections["score"]
    assert Settings.from_dict(settings.to_dict()).prompt == shared
    assert config_with(RecoverConfig(), {"prompt": {"cutoff": 64}}).prompt == PromptFormat("alpaca", 64)
    with pytest.raises(TypeError, match=r"cutoff is now prompt.cutoff: pass prompt=\{'cutoff': ...\}"):
        config_with(RecoverConfig(), {"cutoff": 64})


@pytest.mark.parametrize("text, section, message", [
    ("score:\n  cutoff: 512\n", "select", "score.cutoff is now prompt.cutoff"),
    ("recover:\n  template: chat\n", "recover", "recover.template is now prompt.template"),
    ("evaluate:\n  cutoff: 64\n", "evaluate", "evaluate.cutoff is now prompt.cutoff"),
    ("recover:\n  prompt:\n    cutoff: 64\n", "recover", "recover.prompt: prompt is a section of its own"),
    ("prompt:\n  cutoff: 0\n", "recover", "prompt: cutoff must be positive"),
    ("prompt:\n  template: llama\n", "evaluate", "prompt.template: 'llama' is not one of ['alpaca', 'chat']"),
])
def test_the_prompt_format_is_set_in_its_own_section_only(tmp_path, text, section, message):
    from paser.evaluation.config import EvalConfig
    from paser.recovery.config import RecoverConfig
    from paser.selection.settings import Settings

    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        if section == "select":
            Settings.load(path)
        else:
            load_config({"recover": RecoverConfig, "evaluate": EvalConfig}[section], path, section)
    assert message in str(info.value) and "c.yaml" in str(info.value)


def test_recovery_settings_nest_four_concerns_behind_flat_keys(tmp_path):
    import dataclasses

    from paser.cli.options import field_docs
    from paser.config import concerns, section_keys, to_mapping
    from paser.recovery.config import LossSettings, RecoverConfig, StepSettings

    held = concerns(RecoverConfig)
    assert list(held) == ["lora", "steps", "data", "loss"]
    keys = section_keys(RecoverConfig)
    declared = [f.name for c in held.values() for f in dataclasses.fields(c)]
    own = [f.name for f in dataclasses.fields(RecoverConfig) if f.name not in held]
    assert list(keys) == declared + own and len(set(keys)) == len(keys)  # every key once, in one place
    # the YAML section and overrides stay flat; the object nests
    path = tmp_path / "r.yaml"
    path.write_text("recover:\n  r: 4\n  epochs: 1\n  val_size: 0\n  objective: mix\n  merge: true\n")
    config = load_config(RecoverConfig, path, "recover", {"micro_batch_size": 2})
    assert (config.lora.r, config.steps.epochs, config.data.val_size, config.loss.objective, config.merge,
            config.steps.micro_batch_size) == (4, 1.0, 0, "mix", True, 2)
    assert to_mapping(config) | {"r": 8} == to_mapping(config_with(config, {"r": 8}))  # flat both ways
    assert load_config(RecoverConfig, None, "recover", to_mapping(config)) == config
    with pytest.raises(ConfigError, match="r.yaml: recover.epochs: expected a number"):
        path.write_text("recover:\n  epochs: two\n")
        load_config(RecoverConfig, path, "recover")
    with pytest.raises(ConfigError, match="unknown key.*'lora'"):  # a concern is not a key of the section
        load_config(RecoverConfig, None, "recover", {"lora": {"r": 4}})
    # each concern checks its own fields, also when set through the whole config
    with pytest.raises(ValueError, match="batch_size 6 must be a multiple of micro_batch_size 4"):
        StepSettings(batch_size=6)
    for concern_error in ({"batch_size": 6}, {"dropout": 1.0}, {"val_size": -1}, {"objective": "x"}):
        with pytest.raises(ConfigError):
            load_config(RecoverConfig, None, "recover", concern_error)
        with pytest.raises(ValueError):
            config_with(RecoverConfig(), concern_error)
    with pytest.raises(ValueError, match="token_weighting weights the SFT loss"):
        LossSettings(objective="distill", token_weighting=0.5)
    assert field_docs(RecoverConfig)["r"] == "LoRA rank." and "CUDA" in field_docs(RecoverConfig)["device"]
