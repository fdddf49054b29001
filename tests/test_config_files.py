"""Every YAML under configs/ loads into its dataclass; bad values are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracker.config import ConfigError, load_yaml
from tracker.model.recognizer import RecognizerConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "model").glob("*.yaml")), ids=lambda p: p.name)
def test_model_configs_load(path):
    cfg = load_yaml(RecognizerConfig, path)
    assert cfg.adapter.n_pseudo_tokens >= 0


def test_bad_yaml_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapter:\n  n_pseudo_tokens: eight\n")
    with pytest.raises(ConfigError, match=r"adapter\.n_pseudo_tokens: expected int"):
        load_yaml(RecognizerConfig, bad)
    bad.write_text("label_set: klingon\n")
    with pytest.raises(ConfigError, match="label_set"):
        load_yaml(RecognizerConfig, bad)
    bad.write_text("!!python/object:os.system {}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(RecognizerConfig, bad)


@pytest.mark.parametrize("path", sorted((CONFIGS / "train").rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_train_configs_load_and_their_data_specs_resolve(path):
    from tracker.training.config import TrainConfig

    cfg = TrainConfig.from_yaml(path)
    assert cfg.train and cfg.name
    # the acoustic modalities a config trains are ones the feature code can compute
    from tracker.audio.modalities import ModalityFeatures

    ModalityFeatures(cfg.model.adapter.modalities)
    if cfg.model.adapter.aux_classes:
        from tracker.labels import get_label_set

        assert cfg.model.adapter.aux_classes == len(get_label_set(cfg.model.label_set))
