"""`tracker train --ray`: the Trainer inside Ray Train's TorchTrainer with one CPU worker."""

from __future__ import annotations

import json

import pytest
import torch

from tracker.config import ConfigError
from tracker.model.recognizer import EmotionRecognizer
from tracker.training.distributed import shard
from tracker.training.trainer import Trainer

from tests.test_training import tiny_config

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def local_ray():
    import os

    from tracker.ray_env import RAY_ENV

    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_train_with_one_cpu_worker_matches_the_in_process_run(tmp_path, tiny_backbone, data_dir, local_ray):
    from tracker.training.ray_train import train_with_ray

    over = {"epochs": 2, "train": [{"spec": "meld:train", "limit": 4}], "dev": [{"spec": "meld:dev", "limit": 2}]}
    ray_cfg = tiny_config(tmp_path, name="via-ray", **over)
    metrics = train_with_ray(ray_cfg, progress=False)
    local_cfg = tiny_config(tmp_path, name="local", **over)
    local = Trainer(local_cfg, progress=False).fit()

    run = tmp_path / "via-ray"
    saved = json.loads((run / "metrics.json").read_text())
    assert metrics["rank"] == 0 and metrics["steps"] == saved["steps"] == local["steps"] > 2
    assert metrics["dev"]["meld:dev"]["n"] == local["dev"]["meld:dev"]["n"]
    a = EmotionRecognizer.from_pretrained(run / "last", backbone=tiny_backbone).trainable_state_dict()
    b = EmotionRecognizer.from_pretrained(tmp_path / "local" / "last", backbone=tiny_backbone).trainable_state_dict()
    for k in a:  # same seed, same data, same steps: the same weights (up to float summation order)
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_shards_give_every_worker_the_same_number_of_distinct_batches():
    batches = [[i] for i in range(11)]
    parts = [shard(batches, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]
    flat = [b[0] for p in parts for b in p]
    assert len(set(flat)) == 9
    assert shard(batches, 0, 1) == batches


def test_ray_scaling_is_validated_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match="ray.num_workers"):
        tiny_config(tmp_path, ray={"num_workers": 0})
