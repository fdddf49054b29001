"""Adapter-only training: frozen LLM, cross-entropy over the label set at the answer position.

A run directory holds::

    config.yaml        the TrainConfig used
    last/              resumable state, rewritten every `checkpoint_minutes` and at each evaluation
    best/              the checkpoint with the best dev weighted F1 (loadable with from_pretrained)
    metrics.json       the evaluation history and the best checkpoint's dev reports
    confusion_<dev>.png

Resuming (`fit(resume=True)`, the default) continues from ``last/`` at the exact step: the epoch's
batch order is a pure function of (seed, epoch), so the remaining batches are the same ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from tqdm import tqdm

from tracker.config import to_dict
from tracker.metrics import save_confusion_png
from tracker.model.backbone import bf16_supported
from tracker.model.recognizer import EmotionRecognizer
from tracker.progress import progress_bar
from tracker.training import state as state_io
from tracker.training.config import TrainConfig
from tracker.training.evaluate import evaluate
from tracker.model.adapter import collate_modalities
from tracker.training.distributed import average_gradients, broadcast_flag, broadcast_parameters, shard
from tracker.training.distributed import world as dist_world
from tracker.training.examples import (Example, class_weights, clip_features, feature_statistics, load_examples,
                                       speaker_normalize)
from tracker.training.losses import AnswerLoss

log = logging.getLogger(__name__)

Hook = Callable[[str, dict[str, Any]], None]  # (event, info): "step", "eval", "checkpoint", "done"


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group: int = 50) -> list[list[int]]:
    """Shuffle, sort by length within groups of `group` batches, then shuffle the batches.

    Rows of similar length share a batch (little padding) while the epoch stays random; the order
    depends only on (seed, epoch), which makes resuming exact.
    """
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    batches: list[list[int]] = []
    chunk = batch_size * group
    for start in range(0, len(perm), chunk):
        part = sorted(perm[start : start + chunk].tolist(), key=lambda i: lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def warmup_cosine(total_steps: int, warmup_steps: int, floor: float = 0.05) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Trainer:
    """Trains a recognizer's adapter (and label head) on a TrainConfig's data."""

    def __init__(self, config: TrainConfig, recognizer: EmotionRecognizer | None = None,
                 run_dir: str | Path | None = None, hooks: list[Hook] | None = None, progress: bool = True):
        self.config = config
        self.run_dir = Path(run_dir) if run_dir else Path(os.path.expandvars(config.output_dir)).expanduser() / config.name
        self.hooks = list(hooks or [])
        self.progress = progress
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)
        self.recognizer = recognizer or EmotionRecognizer.from_config(config.model)
        self.train_examples: list[Example] = []
        self.dev_sets: dict[str, list[Example]] = {}

    # ------------------------------------------------------------------ data
    def prepare(self) -> None:
        rec, cfg = self.recognizer, self.config
        k = rec.config.prompt.context_turns
        mods = rec.config.adapter.modalities
        self._augment: dict[int, Any] = {}  # train example index -> its source's ChannelAugment
        for src in cfg.train:
            exs = load_examples(src.spec, rec.label_set, k, src.label_set, src.limit, src.audio, mods,
                                context_min_turns=rec.config.prompt.context_min_turns)
            start = len(self.train_examples)
            # each repeated copy is its own Example: augmentation and speaker normalisation differ per copy
            self.train_examples += [dataclasses.replace(ex, item=dataclasses.replace(ex.item), copy=r,
                                                        speaker_key=f"{ex.speaker_key}#{r}")
                                    for r in range(src.repeat) for ex in exs]
            if src.channel is not None:
                self._augment.update({start + j: src.channel for j in range(len(exs) * src.repeat)
                                      if self.train_examples[start + j].audio is not None})
            log.info("train %s: %d examples (x%d)%s", src.spec, len(exs), src.repeat,
                     ", telephone channel simulated" if src.channel is not None else "")
        self._normalizers: dict[str, Any] = {}
        for src in cfg.dev:
            exs = load_examples(src.spec, rec.label_set, k, src.label_set, src.limit, src.audio, mods,
                                context_min_turns=rec.config.prompt.context_min_turns, channel=src.channel)
            self.dev_sets[src.name] = exs[: cfg.dev_limit] if cfg.dev_limit else exs
        if not self.train_examples:
            raise ValueError("no labelled training examples")
        aux = rec.config.adapter.aux_classes
        if aux and aux != len(rec.label_set):
            raise ValueError(f"model.adapter.aux_classes is {aux}, but the label set {rec.label_set.name} has "
                             f"{len(rec.label_set)} labels; the auxiliary classifiers predict the same labels")
        self._raw = [dict(ex.item.features) for ex in self.train_examples]  # as recorded, before normalisation
        self._features = None
        self._features_epoch: int | None = None
        self._refit_feature_normalisation()
        self._normalizers = rec.speaker_normalizers()  # global statistics = the training data's, just fitted
        for exs in self.dev_sets.values():
            speaker_normalize(exs, self._normalizers, cfg.seed)
        self.set_epoch_features(0)
        self.encoded = [rec.encode(ex.item) for ex in self.train_examples]
        labels = [ex.label for ex in self.train_examples]
        self.loss_weights = torch.tensor(class_weights(labels, len(rec.label_set), cfg.class_weighting), dtype=torch.float32)
        self.answer_loss = AnswerLoss(cfg.loss, len(rec.label_set), labels, self.loss_weights,
                                      focal_gamma=cfg.focal_gamma, logit_adjust_tau=cfg.logit_adjust_tau)

    def set_epoch_features(self, epoch: int) -> None:
        """The training features of `epoch`: telephone-channel variants where configured, then speaker normalisation.

        A pure function of (config, epoch): a resumed run sees the same features. Without
        augmentation or speaker normalisation the recorded features stay as they are.
        """
        if (not self._augment and not self._normalizers) or self._features_epoch == epoch:
            return
        from tracker.audio.channel import channel_rng

        if self._augment and self._features is None:
            from tracker.audio.modalities import ModalityFeatures

            self._features = ModalityFeatures(self.recognizer.config.adapter.modalities)
        n_aug = 0
        for i, ex in progress_bar(list(enumerate(self.train_examples)), desc=f"epoch {epoch} features", leave=False,
                          disable=not (self.progress and self._augment)):
            feats = self._raw[i]
            ch = self._augment.get(i)
            if ch is not None:
                variant = epoch % ch.variants
                if channel_rng(ch.seed, "apply", variant, ex.utterance_id, ex.copy).random() < ch.probability:
                    feats = clip_features(self._features, ex.audio, ch, ch.seed, (variant, ex.utterance_id, ex.copy))
                    n_aug += 1
            ex.item.features = dict(feats)
        speaker_normalize(self.train_examples, self._normalizers, self.config.seed)
        self._features_epoch = epoch
        if self._augment:
            log.info("epoch %d: %d of %d training examples through the telephone channel", epoch, n_aug, len(self.train_examples))

    # ------------------------------------------------------------------ helpers
    def _steps_per_epoch(self) -> int:
        rank, size = dist_world()
        return len(shard(list(range(math.ceil(len(self.train_examples) / self.config.batch_size))), rank, size))

    def _refit_feature_normalisation(self) -> None:
        """Per-feature mean and std of each modality over the recorded training features (saved with the weights)."""
        for m in self.recognizer.config.adapter.modalities:
            stats = feature_statistics(self._raw, m.name)
            if stats is not None:
                self.recognizer.adapter.set_feature_normalisation(m.name, torch.tensor(stats[0]), torch.tensor(stats[1]))

    def _aux_loss(self, modalities, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Mean over modalities of the auxiliary classifiers' cross-entropy on the rows that have them."""
        losses = []
        for logits, present in self.recognizer.adapter.aux_logits(modalities).values():
            if present.any():
                losses.append(torch.nn.functional.cross_entropy(logits[present].float(), labels[present], weight=weights))
        return torch.stack(losses).mean() if losses else torch.zeros((), device=labels.device)

    def warm_up_encoders(self) -> dict[str, float]:
        """Train the acoustic encoders and their auxiliary classifiers alone (no LLM) on the examples with audio.

        A few seconds per epoch, against minutes through the LLM; afterwards the encoders already
        separate emotions, and the main loop has to teach the LLM path to read them.
        """
        cfg, rec = self.config, self.recognizer
        idx = [i for i, ex in enumerate(self.train_examples) if ex.item.features]
        if not idx:
            log.info("encoder warm-up: no training example has audio; skipped")
            return {}
        adapter = rec.adapter
        params = [p for n, p in adapter.named_parameters() if n.startswith(("encoders.", "aux_heads."))]
        opt = torch.optim.AdamW(params, lr=cfg.encoder_warmup_lr, weight_decay=cfg.weight_decay)
        weights = self.loss_weights.to(rec.backbone.device)
        gen = torch.Generator().manual_seed(cfg.seed)
        bs = max(cfg.batch_size, 16)
        adapter.train()
        loss_sum, n = 0.0, 0
        for epoch in range(cfg.encoder_warmup_epochs):
            self.set_epoch_features(epoch)
            order = [idx[int(j)] for j in torch.randperm(len(idx), generator=gen)]
            loss_sum, n = 0.0, 0
            for start in range(0, len(order), bs):
                chunk = order[start : start + bs]
                mods = collate_modalities([self.train_examples[i].item.features for i in chunk], rec.modality_names,
                                          rec.backbone.device)
                labels = torch.tensor([self.train_examples[i].label for i in chunk], device=rec.backbone.device)
                loss = self._aux_loss(mods, labels, weights)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum, n = loss_sum + loss.item() * len(chunk), n + len(chunk)
            self._emit("encoder_warmup", {"epoch": epoch + 1, "loss": loss_sum / max(1, n)})
        log.info("encoder warm-up: %d epochs over %d examples with audio, last loss %.3f",
                 cfg.encoder_warmup_epochs, len(idx), loss_sum / max(1, n))
        return {"loss": loss_sum / max(1, n), "examples": len(idx)}

    def _emit(self, event: str, info: dict[str, Any]) -> None:
        for hook in self.hooks:
            hook(event, info)

    def _autocast(self):
        if self.config.autocast_bf16 and bf16_supported(self.recognizer.backbone.device):
            return torch.autocast(self.recognizer.backbone.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _evaluate_selection(self) -> tuple[float, dict[str, Any]]:
        reports = {}
        for spec, exs in self.dev_sets.items():
            report, _ = evaluate(self.recognizer, exs, batch_size=self.config.batch_size)
            reports[spec] = report
        if not reports:
            return 0.0, reports
        if self.config.select_on == "mean":
            chosen = [r for name, r in reports.items() if not self.config.select_sets or name in self.config.select_sets]
            return sum(r.weighted_f1 for r in chosen) / len(chosen), reports
        return next(iter(reports.values())).weighted_f1, reports

    def _save_last(self, optimizer, scalars: dict[str, Any]) -> None:
        last = self.run_dir / "last"
        self.recognizer.save_pretrained(last)
        state_io.save_state(last, optimizer, scalars)
        self._emit("checkpoint", {"path": str(last), **{k: v for k, v in scalars.items() if k != "history"}})

    # ------------------------------------------------------------------ loop
    def fit(self, resume: bool = True) -> dict[str, Any]:
        cfg, rec = self.config, self.recognizer
        if not self.train_examples:
            self.prepare()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        params = [p for p in rec.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        lengths = [len(e.input_ids) for e in self.encoded]
        rank, size = dist_world()
        steps_per_epoch = self._steps_per_epoch()
        total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
        if cfg.max_steps and cfg.epochs > 0:
            total = min(total, math.ceil(cfg.epochs * steps_per_epoch))
        lr_factor = warmup_cosine(total, int(cfg.warmup_ratio * total))
        s: dict[str, Any] = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "best_score": -1.0,
                             "evals_without_improvement": 0, "history": [], "train_seconds": 0.0,
                             "total_steps": total, "stopped_early": False}
        last = self.run_dir / "last"
        if resume and state_io.has_state(last):
            loaded = EmotionRecognizer.from_pretrained(last, backbone=rec.backbone)
            rec.load_trainable_state_dict(loaded.trainable_state_dict())
            s.update(state_io.load_state(last, optimizer))
            log.info("resumed from %s at step %d", last, s["global_step"])
            self._emit("resume", {"step": s["global_step"]})
        else:
            if cfg.init_from:
                init = Path(os.path.expandvars(cfg.init_from)).expanduser()  # ~ and $VARS, as output_dir
                start = EmotionRecognizer.from_pretrained(init, backbone=rec.backbone)
                fresh = rec.load_trainable_state_dict(start.trainable_state_dict(), strict=False)
                log.info("initialised from %s (%d tensors new: %s)", cfg.init_from, len(fresh), ", ".join(fresh[:8]))
                self._refit_feature_normalisation()  # the new run's data, not the old checkpoint's
            if cfg.encoder_warmup_epochs:
                self.warm_up_encoders()
            broadcast_parameters(params)  # every worker starts from rank 0's weights
        weights = self.loss_weights.to(rec.backbone.device)
        answer_loss = self.answer_loss.to(rec.backbone.device)
        split = None
        if cfg.prefix_without_grad and rec.config.prompt.layout == "context_first":
            from tracker.model.incremental import IncrementalLabeler

            split = IncrementalLabeler(rec, max_cache_bytes=0)
        last_save = time.time()
        ema_loss = None
        bar = progress_bar(total=total, initial=s["global_step"], desc="train", disable=not self.progress, dynamic_ncols=True)
        plain_every = 50 if self.progress and bar.disable else 0  # not a terminal: a plain line now and then
        rec.train()
        while s["global_step"] < total and not s["stopped_early"]:
            self.set_epoch_features(s["epoch"])
            batches = shard(length_grouped_batches(lengths, cfg.batch_size, cfg.seed, s["epoch"]), rank, size)
            while s["step_in_epoch"] < len(batches) and s["global_step"] < total:
                idx = batches[s["step_in_epoch"]]
                t0 = time.time()
                batch = rec.collate([self.train_examples[i].item for i in idx], [self.encoded[i] for i in idx])
                labels = torch.tensor([self.train_examples[i].label for i in idx], device=rec.backbone.device)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * lr_factor(s["global_step"])
                with self._autocast():
                    if split is not None:
                        logits = split.train_logits([self.train_examples[i].item for i in idx], [self.encoded[i] for i in idx])
                    else:
                        logits = rec(batch)
                loss = answer_loss(logits, labels)
                if cfg.aux_loss_weight > 0 and batch.modalities:
                    loss = loss + cfg.aux_loss_weight * self._aux_loss(batch.modalities, labels, weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                average_gradients(params)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                dt = time.time() - t0
                s["train_seconds"] += dt
                s["global_step"] += 1
                s["step_in_epoch"] += 1
                ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
                bar.update(1)
                bar.set_postfix(loss=f"{ema_loss:.3f}", utt_s=f"{len(idx) / dt:.1f}", epoch=s["epoch"])
                if plain_every and s["global_step"] % plain_every == 0:
                    print(f"train step {s['global_step']}/{total} loss {ema_loss:.3f} epoch {s['epoch']} "
                          f"{len(idx) / dt:.1f} utt/s", file=sys.stderr, flush=True)
                self._emit("step", {"step": s["global_step"], "loss": loss.item(), "utt_per_s": len(idx) / dt})
                epoch_done = s["step_in_epoch"] >= len(batches)
                due = cfg.eval_every_steps and s["global_step"] % cfg.eval_every_steps == 0
                if due or (epoch_done and not cfg.eval_every_steps) or s["global_step"] >= total:
                    if rank == 0:
                        self._eval_step(s, optimizer)
                    s["stopped_early"] = broadcast_flag(s["stopped_early"])
                    rec.train()
                    last_save = time.time()
                    if s["stopped_early"]:
                        break
                elif rank == 0 and time.time() - last_save > 60 * cfg.checkpoint_minutes:
                    self._save_last(optimizer, s)
                    last_save = time.time()
            if s["step_in_epoch"] >= len(batches):
                s["epoch"] += 1
                s["step_in_epoch"] = 0
        bar.close()
        rec.eval()
        if rank != 0:
            return {"steps": s["global_step"], "rank": rank, "train_seconds": s["train_seconds"]}
        return self._finish(s)

    def _eval_step(self, s: dict[str, Any], optimizer) -> None:
        score, reports = self._evaluate_selection()
        entry = {"step": s["global_step"], "epoch": s["epoch"] + s["step_in_epoch"] / max(1, self._steps_per_epoch()),
                 **{f"{spec}/{m}": getattr(r, m) for spec, r in reports.items() for m in ("weighted_f1", "accuracy")}}
        s["history"].append(entry)
        improved = score > s["best_score"]
        if improved:
            s["best_score"] = score
            s["evals_without_improvement"] = 0
            self.recognizer.save_pretrained(self.run_dir / "best")
        else:
            s["evals_without_improvement"] += 1
            if s["evals_without_improvement"] >= self.config.patience:
                s["stopped_early"] = True
        log.info("eval at step %d: %s (best %.4f)", s["global_step"], entry, s["best_score"])
        tqdm.write(f"eval step {s['global_step']}: " + "  ".join(f"{k} {v:.4f}" for k, v in entry.items() if "/" in k))
        self._emit("eval", {**entry, "improved": improved})
        self._save_last(optimizer, s)

    def _finish(self, s: dict[str, Any]) -> dict[str, Any]:
        best = self.run_dir / "best"
        result: dict[str, Any] = {"history": s["history"], "steps": s["global_step"], "stopped_early": s["stopped_early"],
                                  "train_seconds": s["train_seconds"],
                                  "seconds_per_epoch": s["train_seconds"] * self._steps_per_epoch() / max(1, s["global_step"]),
                                  "trainable_parameters": self.recognizer.num_trainable_parameters(), "dev": {}}
        if best.exists() and self.dev_sets:
            model = EmotionRecognizer.from_pretrained(best, backbone=self.recognizer.backbone)
            for spec, exs in self.dev_sets.items():
                report, _ = evaluate(model, exs, batch_size=self.config.batch_size)
                result["dev"][spec] = report.to_dict()
                save_confusion_png(report, self.run_dir / f"confusion_{spec.replace(':', '_').replace('/', '_')}.png", title=spec)
        (self.run_dir / "metrics.json").write_text(json.dumps(result, indent=2))
        self._emit("done", result)
        return result
