"""The training job's configuration (``configs/train/*.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tracker.audio.channel import ChannelConfig
from tracker.config import ConfigError, load_yaml
from tracker.model.recognizer import RecognizerConfig


TELEPHONE_DEV_SEED = 20261204  # the seed of the telephone-band dev copies (`<spec>+telephone` in tracker eval)


@dataclass
class ChannelAugment(ChannelConfig):
    """Telephone-channel simulation of a data source's audio (tracker.audio.channel), seeded.

    In training, each epoch uses variant ``epoch % variants``; in a variant each clip (and each
    repeated copy of it) goes through the channel with probability ``probability``, with draws that
    depend only on (seed, variant, clip, copy), so runs and resumed runs see the same audio and at
    most ``variants`` augmented copies of a clip are ever computed (features are cached on disk).
    For a dev source the channel is applied to every clip once with ``seed``: a telephone-band copy.
    """

    probability: float = 1.0
    seed: int = 0
    variants: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.probability <= 1.0:
            raise ConfigError(f"channel.probability: must lie in (0, 1], got {self.probability!r}")
        if self.variants < 1:
            raise ConfigError(f"channel.variants: must be >= 1, got {self.variants!r}")


@dataclass
class DataSource:
    """One dataset to train or evaluate on."""

    spec: str  # meld:train, ravdess:dev, a .jsonl path ... (see docs/data-format.md)
    label_set: str = ""  # read labels as this set ("" = the dataset's own; ravdess -> meld7 folds them)
    repeat: int = 1  # oversampling factor in training
    limit: int = 0  # keep only the first N conversations (0 = all); for quick runs and tests
    audio: bool = True  # use the audio when the dataset has it
    channel: ChannelAugment | None = None  # telephone-channel simulation of the audio (None = as recorded)

    @property
    def name(self) -> str:
        """The source's name in reports: its spec, marked when the audio goes through the telephone channel."""
        return f"{self.spec}+telephone" if self.channel is not None else self.spec

    def __post_init__(self) -> None:
        if self.repeat < 1:
            raise ConfigError(f"repeat: must be >= 1, got {self.repeat}")
        if self.limit < 0:
            raise ConfigError(f"limit: must be >= 0, got {self.limit}")


@dataclass
class RayScaling:
    """How `tracker train --ray` spreads the job over a Ray cluster (Ray Train's ScalingConfig)."""

    num_workers: int = 1  # data-parallel workers; gradients are averaged across them every step
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = 1.0
    storage_path: str = ""  # where Ray Train keeps the run's results ("" = Ray's default, ~/ray_results)

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"ray.num_workers: must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"ray.cpus_per_worker: must be > 0, got {self.cpus_per_worker}")


@dataclass
class TrainConfig:
    """Adapter-only training of a recognizer on a frozen LLM."""

    name: str = "run"
    output_dir: str = "runs"  # the run writes to output_dir/name ("~" and $VARS are expanded)
    init_from: str = ""  # start from this checkpoint's weights when the run has no resumable state
    model: RecognizerConfig = field(default_factory=RecognizerConfig)
    train: list[DataSource] = field(default_factory=lambda: [DataSource("meld:train")])
    dev: list[DataSource] = field(default_factory=lambda: [DataSource("meld:dev")])
    # which dev figure picks the best checkpoint and drives early stopping: the first dev set's
    # weighted F1 ("first"), or the mean weighted F1 over all dev sets ("mean")
    select_on: Literal["first", "mean"] = "first"
    # with select_on: mean, the dev sets (by report name, e.g. ravdess:dev+telephone) whose weighted F1
    # is averaged; empty = all of them. A dev set left out is still evaluated and reported.
    select_sets: list[str] = field(default_factory=list)
    epochs: float = 3.0
    max_steps: int = 0  # stop after this many optimiser steps (0 = no limit)
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    class_weighting: Literal["none", "inverse_sqrt", "inverse"] = "inverse_sqrt"
    # the answer loss (tracker.training.losses): ce, focal ((1 - p)^focal_gamma x CE) or logit_adjusted
    # (CE on logits + logit_adjust_tau x log train prior; plain logits at inference)
    loss: Literal["ce", "focal", "logit_adjusted"] = "ce"
    focal_gamma: float = 2.0
    logit_adjust_tau: float = 1.0
    eval_every_steps: int = 0  # 0 = once per epoch
    patience: int = 3  # evaluations without dev improvement before stopping
    checkpoint_minutes: float = 3.0  # resumable state is written at least this often
    seed: int = 0
    autocast_bf16: bool = True  # bf16 autocast where supported
    # context_first prompts: run the past-turns prefix (no trainable input) outside autograd, so the
    # backward pass covers the suffix only (tracker.model.incremental.IncrementalLabeler.train_logits);
    # the same logits and gradients as the plain forward, in less time
    prefix_without_grad: bool = True
    num_threads: int = 0  # torch threads (0 = torch's default)
    dev_limit: int = 0  # evaluate on the first N dev utterances only (0 = all)
    # Auxiliary loss on the adapter's per-modality classifiers (needs model.adapter.aux_classes = the
    # label set's size): loss = CE(LLM answer) + aux_loss_weight * CE(acoustic encoders alone).
    aux_loss_weight: float = 0.0
    # Before the main loop of a fresh run, train only the acoustic encoders and their auxiliary
    # classifiers (no LLM, seconds per epoch) for this many epochs over the examples with audio.
    encoder_warmup_epochs: int = 0
    encoder_warmup_lr: float = 1e-3
    ray: RayScaling = field(default_factory=RayScaling)  # used by `tracker train --ray` only

    def __post_init__(self) -> None:
        if not self.train:
            raise ConfigError("train: at least one data source is needed")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("epochs: must be > 0 (or set max_steps)")
        for name in ("batch_size",):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio: must lie in [0, 1), got {self.warmup_ratio}")
        if self.select_on not in ("first", "mean"):
            raise ConfigError(f"select_on: must be first or mean, got {self.select_on!r}")
        unknown = sorted(set(self.select_sets) - {d.name for d in self.dev})
        if unknown:
            raise ConfigError(f"select_sets: {unknown} are not dev sets (dev: {[d.name for d in self.dev]})")
        if self.class_weighting not in ("none", "inverse_sqrt", "inverse"):
            raise ConfigError(f"class_weighting: must be none, inverse_sqrt or inverse, got {self.class_weighting!r}")
        if self.loss not in ("ce", "focal", "logit_adjusted"):
            raise ConfigError(f"loss: must be ce, focal or logit_adjusted, got {self.loss!r}")
        if self.focal_gamma < 0:
            raise ConfigError(f"focal_gamma: must be >= 0, got {self.focal_gamma}")
        if self.logit_adjust_tau < 0:
            raise ConfigError(f"logit_adjust_tau: must be >= 0, got {self.logit_adjust_tau}")
        if self.aux_loss_weight < 0:
            raise ConfigError(f"aux_loss_weight: must be >= 0, got {self.aux_loss_weight}")
        if self.encoder_warmup_epochs < 0:
            raise ConfigError(f"encoder_warmup_epochs: must be >= 0, got {self.encoder_warmup_epochs}")
        if (self.aux_loss_weight > 0 or self.encoder_warmup_epochs > 0) and self.model.adapter.aux_classes == 0:
            raise ConfigError("aux_loss_weight/encoder_warmup_epochs: need model.adapter.aux_classes > 0 "
                              "(the auxiliary classifiers they train)")
        if self.checkpoint_minutes <= 0:
            raise ConfigError(f"checkpoint_minutes: must be > 0, got {self.checkpoint_minutes}")

    @classmethod
    def from_yaml(cls, path: str) -> "TrainConfig":
        return load_yaml(cls, path)
