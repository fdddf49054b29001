"""Offline training of the refiner: cached base predictions and window slot states, then head + RFAttention.

The LLM is frozen and so is the base recognizer, so everything heavy is computed once and cached as
``.npz`` (numpy arrays only, no pickles) under the cache directory:

* ``base-<data>.npz``: the base recognizer's class probabilities per utterance, with gold labels;
* ``slots-<data>-w<w>s<s>-L<layer>.npz``: every utterance's t slot hidden states (N, t, H) in fp16,
  with its position in each window and which of its windows it is.

Training the head and the weighting module on those arrays takes seconds. The step with the best
dev weighted F1 is kept.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tracker.data import load_dataset
from tracker.data.records import Conversation
from tracker.metrics import classification_report
from tracker.model.recognizer import EmotionRecognizer
from tracker.model.refine import Refiner, WindowItem
from tracker.training.examples import examples_from_conversations

log = logging.getLogger(__name__)


def sample_conversations(spec: str, limit: int, seed: int = 0) -> list[Conversation]:
    """All conversations of `spec`, or `limit` of them drawn at random (seeded), kept in source order."""
    convs = [c for c in load_dataset(spec) if len(c)]
    if limit and limit < len(convs):
        keep = sorted(np.random.default_rng(seed).choice(len(convs), size=limit, replace=False))
        convs = [convs[i] for i in keep]
    return convs


def _key(spec: str, limit: int, seed: int) -> str:
    return f"{spec.replace(':', '-').replace('/', '_')}-n{limit or 'all'}-seed{seed}"


def _checkpoint_tag(path: str | Path) -> str:
    """The base adapter's weights (what a refiner records as ``base_checkpoint_sha1``, and the service checks)."""
    return hashlib.sha1((Path(path) / "model.safetensors").read_bytes()).hexdigest()[:10]


def _cache_tag(path: str | Path) -> str:
    """Names the cached features: the weights and the config, so a new temperature or prompt window recomputes them."""
    h = hashlib.sha1((Path(path) / "model.safetensors").read_bytes())
    h.update((Path(path) / "config.json").read_bytes())
    return h.hexdigest()[:10]


def base_probabilities(recognizer: EmotionRecognizer, convs: list[Conversation], cache: Path, batch_size: int = 8) -> dict[str, np.ndarray]:
    """Base class probabilities (N, L), gold labels (N,) and conversation index (N,), cached."""
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    prompt = recognizer.config.prompt  # the context window the service gives the base model (block-sliding for context_first)
    examples = examples_from_conversations(convs, recognizer.label_set, prompt.context_turns,
                                           context_min_turns=prompt.context_min_turns)
    conv_of = [ci for ci, c in enumerate(convs) for u in c if u.label is not None]
    if len(examples) != sum(len(c) for c in convs):
        raise ValueError("every utterance needs a gold label for refiner training")
    t0 = time.perf_counter()
    probs = recognizer.predict_proba([e.item for e in examples], batch_size=batch_size)
    log.info("base probabilities of %d utterances in %.0f s", len(examples), time.perf_counter() - t0)
    out = {"base": probs.astype(np.float32), "labels": np.array([e.label for e in examples]), "conv": np.array(conv_of)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def slot_states(refiner: Refiner, convs: list[Conversation], base: np.ndarray, cache: Path,
                batch_size: int = 4) -> dict[str, np.ndarray]:
    """Every utterance's t slot hidden states (N, t, H) fp16, positions (N, t), order (N, t); cached."""
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    spec = refiner.spec
    t = spec.t
    n_total = sum(len(c) for c in convs)
    H = refiner.backbone.hidden_size
    hidden = np.zeros((n_total, t, H), dtype=np.float16)
    pos = np.zeros((n_total, t), dtype=np.int64)
    order = np.zeros((n_total, t), dtype=np.int64)
    filled = np.zeros((n_total, t), dtype=bool)
    jobs = []  # (global offset, window, items)
    offset = 0
    for c in convs:
        items = [WindowItem(u.speaker, u.text, base[offset + i]) for i, u in enumerate(c)]
        for w in spec.windows(len(c)):
            jobs.append((offset, w, [items[i] for i in w.members]))
        offset += len(c)
    jobs.sort(key=lambda j: len(j[2]))  # similar lengths in one batch pad little
    t0 = time.perf_counter()
    for b in range(0, len(jobs), batch_size):
        chunk = jobs[b : b + batch_size]
        states = refiner.slot_hidden([j[2] for j in chunk])
        for (off, w, _), h in zip(chunk, states):
            for row, i in enumerate(w.members):
                r = w.index - spec.windows_of(i)[0]
                hidden[off + i, r] = h[row].cpu().numpy().astype(np.float16)
                pos[off + i, r] = w.position(i)
                order[off + i, r] = r
                filled[off + i, r] = True
        if (b // batch_size) % 50 == 0:
            log.info("windows %d/%d (%.0f s)", b + len(chunk), len(jobs), time.perf_counter() - t0)
    if not filled.all():
        raise AssertionError("an utterance did not get all of its t window judgements")
    out = {"hidden": hidden, "position": pos, "order": order, "windows": np.array(len(jobs)),
           "seconds": np.array(time.perf_counter() - t0)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def subset(features: tuple[dict, dict], keep: np.ndarray) -> tuple[dict, dict]:
    """The utterances `keep` (a boolean mask) of cached (slots, base) arrays."""
    slots, base = features
    return ({k: (v[keep] if np.ndim(v) and len(v) == len(keep) else v) for k, v in slots.items()},
            {k: (v[keep] if np.ndim(v) and len(v) == len(keep) else v) for k, v in base.items()})


@torch.no_grad()
def predict(refiner: Refiner, features: tuple[dict, dict]) -> np.ndarray:
    """Final distributions (N, L) of cached utterances."""
    H, P, O, B, _ = _tensors(*features)
    return refiner.attention(refiner.head(H), P, O, torch.ones(P.shape, dtype=torch.bool), B).double().numpy()


@dataclass
class FitResult:
    best_step: int
    dev_wf1: float
    dev_acc: float
    base_wf1: float
    base_acc: float
    judge_only_wf1: float
    history: list[tuple[int, float]]


def _tensors(slots: dict[str, np.ndarray], base: dict[str, np.ndarray]):
    return (torch.from_numpy(slots["hidden"].astype(np.float32)), torch.from_numpy(slots["position"]),
            torch.from_numpy(slots["order"]), torch.from_numpy(base["base"].astype(np.float32)),
            torch.from_numpy(base["labels"]))


def fit(refiner: Refiner, train: tuple[dict, dict], dev: tuple[dict, dict], steps: int = 400, lr: float = 1e-3,
        weight_decay: float = 1e-3, aux: float = 0.0, eval_every: int = 10, seed: int = 0) -> FitResult:
    """Train the head and RFAttention full-batch on cached arrays; keep the step with the best dev weighted F1.

    ``aux`` adds a cross-entropy on each window judgement alone. Defaults (lr 1e-3, aux 0) were chosen
    by the 2-fold dev estimate of bench/refine_eval.py among lr {3e-3, 1e-3}, aux {0, 0.2, 0.5},
    weight decay {1e-3, 5e-2}, steps {400, 800} (BENCHMARKS.md).
    """
    torch.manual_seed(seed)
    labels = list(refiner.label_set.labels)
    L = len(labels)
    Htr, Ptr, Otr, Btr, Ytr = _tensors(*train)
    Hdv, Pdv, Odv, Bdv, Ydv = _tensors(*dev)
    counts = torch.bincount(Ytr, minlength=L).float().clamp_min(1)
    cw = (counts.sum() / counts).sqrt()
    cw = cw / (cw * counts).sum() * counts.sum()  # inverse square root of frequency, mean weight 1
    params = list(refiner.head.parameters()) + list(refiner.attention.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    mask_tr = torch.ones(Ptr.shape, dtype=torch.bool)
    mask_dv = torch.ones(Pdv.shape, dtype=torch.bool)
    base_rep = classification_report(Ydv.tolist(), Bdv.argmax(1).tolist(), labels)

    def dev_eval():
        with torch.no_grad():
            logits = refiner.head(Hdv)
            final = refiner.attention(logits, Pdv, Odv, mask_dv, Bdv)
            judge = torch.softmax(logits, -1).mean(1)
        return (classification_report(Ydv.tolist(), final.argmax(1).tolist(), labels),
                classification_report(Ydv.tolist(), judge.argmax(1).tolist(), labels))

    best = (-1.0, 0, None, 0.0, 0.0)
    history = []
    for step in range(1, steps + 1):
        refiner.head.train()
        refiner.attention.train()
        logits = refiner.head(Htr)  # (N, t, L)
        final = refiner.attention(logits, Ptr, Otr, mask_tr, Btr)  # (N, L)
        loss = torch.nn.functional.nll_loss(final.clamp_min(1e-8).log(), Ytr, weight=cw)
        if aux:
            t = logits.shape[1]
            loss = loss + aux * torch.nn.functional.cross_entropy(logits.reshape(-1, L), Ytr.repeat_interleave(t), weight=cw)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            rep, judge_rep = dev_eval()
            history.append((step, rep.weighted_f1))
            if rep.weighted_f1 > best[0]:
                state = {k: v.detach().clone() for k, v in refiner.trainable_state_dict().items()}
                best = (rep.weighted_f1, step, state, rep.accuracy, judge_rep.weighted_f1)
    refiner.load_trainable_state_dict(best[2])
    refiner.eval()
    return FitResult(best_step=best[1], dev_wf1=best[0], dev_acc=best[3], base_wf1=base_rep.weighted_f1,
                     base_acc=base_rep.accuracy, judge_only_wf1=best[4], history=history)


class CachedRefiner(torch.nn.Module):
    """The trainable part of a Refiner (label head + RFAttention) without a backbone: trains on cached states.

    Its state dict has the Refiner's names, so :func:`write_refiner` saves a checkpoint that
    ``Refiner.from_pretrained`` loads onto the real backbone.
    """

    def __init__(self, config, label_set, hidden_size: int, seed: int = 0):
        from tracker.model.refine import RFAttention

        super().__init__()
        torch.manual_seed(seed)
        self.config, self.label_set, self.hidden_size = config, label_set, hidden_size
        self.head = torch.nn.Linear(hidden_size, len(label_set))
        torch.nn.init.normal_(self.head.weight, std=0.01)
        torch.nn.init.zeros_(self.head.bias)
        self.attention = RFAttention(len(label_set), config.window, config.spec.t, config.mlp_hidden)

    trainable_state_dict = Refiner.trainable_state_dict
    load_trainable_state_dict = Refiner.load_trainable_state_dict


def write_refiner(model: CachedRefiner, directory: str | Path, extra: dict | None = None) -> Path:
    """A refiner checkpoint (config.json + model.safetensors) for the backbone the config names."""
    from tracker.config import to_dict
    from tracker.model import checkpoint as ckpt
    from tracker.model.refine import FORMAT

    payload = {"format": FORMAT, "backbone": model.config.backbone, "llm_hidden_size": model.hidden_size,
               "label_set": model.label_set.to_dict(), "refiner": to_dict(model.config), **(extra or {})}
    return ckpt.write_checkpoint(directory, payload, model.trainable_state_dict())
