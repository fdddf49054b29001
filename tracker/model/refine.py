"""Conversation-level refinement after Lantern: window re-judgements merged by receptive-field-aware attention.

For each receptive field (tracker.model.windows) the frozen LLM reads one prompt listing the window's
utterances, each with the base recognizer's reference (its top classes with probabilities, and the
valence/arousal those probabilities imply), followed by one answer slot per utterance::

    <bos>Conversation excerpt; each line has a first guess of the speaker's emotion.
    [1] Monica: What? (first guess: neutral 62%, surprise 21%, joy 9%; valence +0.05, arousal 0.37)
    [2] Ross: ...
    Re-judge each utterance using the whole excerpt. Choose one of: neutral, joy, ...
    [1] Monica's emotion:     <- slot 1's hidden state
    [2] Ross's emotion:       <- slot 2's hidden state

All slots come after the whole transcript, so each slot sees every utterance of the window; one forward
pass per window scores every member (the hidden state at a slot's last token, after decoder layer
``head_layer``, final-normed, through a small trainable linear head over the label set).

:class:`RFAttention` then merges an utterance's t window judgements and its base prediction: each
judgement gets a score from learned embeddings of its position in the window and of which of the t
windows it came from, plus a small MLP over its distribution (probabilities, entropy, maximum); the
base prediction gets its own score; the final distribution is the softmax-weighted mixture.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from tracker.config import ConfigError, load_dataclass, to_dict
from tracker.labels import LabelSet, get_label_set
from tracker.model import checkpoint as ckpt
from tracker.model.backbone import Backbone, load_backbone
from tracker.model.llm_layers import EarlyExit, decoder_layers, final_norm
from tracker.model.windows import WindowSpec

FORMAT = "tracker.refiner"

# Fixed valence (-1..1) and arousal (0..1) per emotion, used to turn the base recognizer's class
# probabilities into the valence/arousal reference shown in the prompt (expected value under the
# distribution). Valence matches tracker.labels; arousal follows the usual circumplex placement
# (anger/fear/surprise high, sadness low, neutral low-middle). Labels not listed take the label
# set's value as valence and 0.4 arousal.
VALENCE_AROUSAL: dict[str, tuple[float, float]] = {
    "neutral": (0.0, 0.3), "calm": (0.3, 0.1), "peaceful": (0.5, 0.2),
    "joy": (0.8, 0.6), "joyful": (0.8, 0.6), "happy": (0.8, 0.6), "powerful": (0.5, 0.7),
    "surprise": (0.2, 0.8), "surprised": (0.2, 0.8),
    "anger": (-0.7, 0.9), "angry": (-0.7, 0.9), "mad": (-0.7, 0.9),
    "sadness": (-0.7, 0.2), "sad": (-0.7, 0.2),
    "disgust": (-0.6, 0.5),
    "fear": (-0.6, 0.8), "fearful": (-0.6, 0.8), "scared": (-0.6, 0.8),
}


def valence_arousal_table(label_set: LabelSet) -> np.ndarray:
    """(L, 2) valence and arousal per class of `label_set`."""
    rows = []
    for lab, val in zip(label_set.labels, label_set.values):
        rows.append(VALENCE_AROUSAL.get(lab, (float(val), 0.4)))
    return np.asarray(rows, dtype=np.float64)


@dataclass
class RefinerConfig:
    """A refiner: receptive fields, the prompt, where the slots are read, and the weighting module."""

    backbone: str = "gemma3-270m"
    label_set: str = "meld7"
    window: int = 4  # w utterances per receptive field
    stride: int = 2  # s; t = w / s windows hold every utterance
    head_layer: int = 12  # slot hidden states after this decoder layer (0 = last layer)
    top_k: int = 3  # base classes shown per utterance
    max_utterance_tokens: int = 48
    mlp_hidden: int = 16  # RFAttention's scoring MLP

    def __post_init__(self) -> None:
        try:
            WindowSpec(self.window, self.stride)
        except ValueError as exc:
            raise ConfigError(f"window/stride: {exc}") from None
        if self.head_layer < 0:
            raise ConfigError(f"head_layer: must be >= 0, got {self.head_layer}")
        if self.top_k < 1:
            raise ConfigError(f"top_k: must be >= 1, got {self.top_k}")
        if self.max_utterance_tokens < 1 or self.mlp_hidden < 1:
            raise ConfigError("max_utterance_tokens and mlp_hidden must be >= 1")
        try:
            get_label_set(self.label_set)
        except KeyError as exc:
            raise ConfigError(f"label_set: {exc.args[0]}") from None

    @property
    def spec(self) -> WindowSpec:
        return WindowSpec(self.window, self.stride)


@dataclass
class WindowItem:
    """One utterance of a window as the prompt shows it."""

    speaker: str
    text: str
    base_probs: Sequence[float]  # the base recognizer's distribution over the label set


@dataclass
class EncodedWindow:
    input_ids: list[int]
    slots: list[int]  # token index of each member's answer slot, in member order


def _clean(text: str) -> str:
    return " ".join(str(text).split())


class WindowPromptBuilder:
    """Token ids of a window prompt and the positions of its answer slots."""

    def __init__(self, tokenizer, label_set: LabelSet, config: RefinerConfig):
        self.tokenizer = tokenizer
        self.label_set = label_set
        self.config = config
        self.va = valence_arousal_table(label_set)
        self._bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad if pad is not None else 0)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def reference(self, probs: Sequence[float]) -> str:
        p = np.asarray(probs, dtype=np.float64)
        top = np.argsort(-p)[: self.config.top_k]
        classes = ", ".join(f"{self.label_set.words[i]} {round(100 * p[i])}%" for i in top)
        v, a = p @ self.va
        return f"first guess: {classes}; valence {v:+.2f}, arousal {a:.2f}"

    def encode(self, items: Sequence[WindowItem]) -> EncodedWindow:
        if not items:
            raise ValueError("a window needs at least one utterance")
        ids = self._bos + self._encode("Conversation excerpt; each line has a first guess of the speaker's emotion.\n")
        for j, it in enumerate(items, 1):
            if len(it.base_probs) != len(self.label_set):
                raise ValueError(f"base_probs: expected {len(self.label_set)} values, got {len(it.base_probs)}")
            speaker = _clean(it.speaker) or "Speaker"
            words = self._encode(_clean(it.text))[: self.config.max_utterance_tokens] or self._encode("...")
            ids += self._encode(f"[{j}] {speaker}: ") + words + self._encode(f" ({self.reference(it.base_probs)})\n")
        ids += self._encode(
            "Re-judge each utterance's emotion using the whole excerpt. Choose one of: "
            + ", ".join(self.label_set.words) + ".\n"
        )
        slots = []
        for j, it in enumerate(items, 1):
            speaker = _clean(it.speaker) or "Speaker"
            ids += self._encode(f"[{j}] {speaker}'s emotion:")
            slots.append(len(ids) - 1)
            ids += self._encode("\n")
        return EncodedWindow(ids, slots)


def hidden_at(llm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
    """Hidden states (B, T, H) after decoder layer `layer` (0 = last), final-normed; stops the forward there."""
    if layer == 0:
        return llm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    captured: dict[str, torch.Tensor] = {}

    def stop_here(_module, _inputs, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise EarlyExit

    handle = decoder_layers(llm)[layer - 1].register_forward_hook(stop_here)
    try:
        llm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except EarlyExit:
        pass
    finally:
        handle.remove()
    return final_norm(llm)(captured["h"])


class RFAttention(nn.Module):
    """Receptive-field-aware attention weighting over an utterance's t judgements and its base prediction."""

    def __init__(self, n_labels: int, window: int, t: int, hidden: int = 16):
        super().__init__()
        self.position = nn.Embedding(window, 1)  # where the utterance sat in the window (0..w-1)
        self.order = nn.Embedding(t, 1)  # which of its t windows (0 = the earliest)
        self.score = nn.Sequential(nn.Linear(n_labels + 2, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.base_score = nn.Sequential(nn.Linear(n_labels + 2, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        for emb in (self.position, self.order):
            nn.init.zeros_(emb.weight)

    @staticmethod
    def _features(probs: torch.Tensor) -> torch.Tensor:
        """(..., L) -> (..., L + 2): probabilities, normalised entropy, maximum."""
        ent = -(probs * probs.clamp_min(1e-9).log()).sum(-1, keepdim=True) / math.log(probs.shape[-1])
        return torch.cat([probs, ent, probs.max(-1, keepdim=True).values], dim=-1)

    def weights(self, judge_logits: torch.Tensor, positions: torch.Tensor, order: torch.Tensor,
                mask: torch.Tensor, base_probs: torch.Tensor) -> torch.Tensor:
        """Attention weights (N, 1 + t): column 0 the base prediction, then the judgements."""
        jp = torch.softmax(judge_logits.float(), dim=-1)  # (N, t, L)
        s = self.score(self._features(jp)).squeeze(-1) + self.position(positions).squeeze(-1) + self.order(order).squeeze(-1)
        s = s.masked_fill(~mask, float("-inf"))  # (N, t)
        b = self.base_score(self._features(base_probs.float()))  # (N, 1)
        return torch.softmax(torch.cat([b, s], dim=1), dim=1)  # (N, 1 + t)

    def forward(self, judge_logits: torch.Tensor, positions: torch.Tensor, order: torch.Tensor,
                mask: torch.Tensor, base_probs: torch.Tensor) -> torch.Tensor:
        """Final distribution (N, L) from judgements (N, t, L), positions/order/mask (N, t), base (N, L)."""
        a = self.weights(judge_logits, positions, order, mask, base_probs)
        jp = torch.softmax(judge_logits.float(), dim=-1)
        return a[:, :1] * base_probs.float() + (a[:, 1:, None] * jp).sum(1)


@dataclass
class Judgement:
    """One window's view of one utterance."""

    logits: np.ndarray  # (L,)
    position: int  # 0..w-1 within the nominal window
    order: int  # 0..t-1: which of the utterance's windows


class Refiner(nn.Module):
    """Window judgements with the frozen LLM plus the RFAttention merge. Trainable: head and weighting only."""

    def __init__(self, backbone: Backbone, config: RefinerConfig | None = None, label_set: LabelSet | None = None):
        super().__init__()
        self.config = dataclasses.replace(config or RefinerConfig())
        if self.config.head_layer > backbone.num_layers:
            raise ConfigError(f"head_layer: {self.config.head_layer} exceeds the backbone's {backbone.num_layers} layers")
        self.backbone = backbone
        self.llm = backbone.model
        self.label_set = label_set or get_label_set(self.config.label_set)
        self.spec = self.config.spec
        self.prompt = WindowPromptBuilder(backbone.tokenizer, self.label_set, self.config)
        n = len(self.label_set)
        self.head = nn.Linear(backbone.hidden_size, n)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.attention = RFAttention(n, self.config.window, self.spec.t, self.config.mlp_hidden)
        self.head.to(backbone.device)
        self.attention.to(backbone.device)
        self.eval()

    # ------------------------------------------------------------------ persistence
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        state.update({f"attention.{k}": v for k, v in self.attention.state_dict().items()})
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        self.attention.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("attention.")})

    def save_pretrained(self, directory: str | Path, extra: dict | None = None) -> Path:
        payload = {"format": FORMAT, "backbone": self.backbone.name, "llm_hidden_size": self.backbone.hidden_size,
                   "label_set": self.label_set.to_dict(), "refiner": to_dict(self.config), **(extra or {})}
        return ckpt.write_checkpoint(directory, payload, self.trainable_state_dict())

    @staticmethod
    def read_config(directory: str | Path) -> tuple[RefinerConfig, LabelSet, int]:
        data = ckpt.read_config(directory, expected_format=FORMAT)
        try:
            return (load_dataclass(RefinerConfig, data["refiner"]), LabelSet.from_dict(data["label_set"]),
                    int(data["llm_hidden_size"]))
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise ckpt.CheckpointError(f"{Path(directory) / ckpt.CONFIG_NAME}: invalid refiner config: {exc}") from None

    @classmethod
    def from_pretrained(cls, directory: str | Path, backbone: Backbone | None = None, device: str = "cpu",
                        dtype: str = "auto") -> "Refiner":
        config, label_set, hidden = cls.read_config(directory)
        backbone = backbone or load_backbone(config.backbone, dtype=dtype, device=device)
        if backbone.hidden_size != hidden:
            raise ckpt.CheckpointError(
                f"refiner {directory} was trained on a backbone with hidden size {hidden}, "
                f"but {backbone.name!r} has {backbone.hidden_size}"
            )
        model = cls(backbone, config, label_set)
        expected = {k: v.shape for k, v in model.trainable_state_dict().items()}
        model.load_trainable_state_dict(ckpt.read_weights(directory, expected))
        model.eval()
        return model

    def train(self, mode: bool = True) -> "Refiner":
        super().train(mode)
        self.llm.eval()
        return self

    # ------------------------------------------------------------------ the LLM part
    @torch.no_grad()
    def slot_hidden(self, windows: Sequence[Sequence[WindowItem]]) -> list[torch.Tensor]:
        """One forward per window (batched): each window's slot hidden states (members, H), float32."""
        encoded = [self.prompt.encode(w) for w in windows]
        width = max(len(e.input_ids) for e in encoded)
        ids = torch.full((len(encoded), width), self.prompt.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[i, : len(e.input_ids)] = 1
        device = self.backbone.device
        hidden = hidden_at(self.llm, ids.to(device), mask.to(device), self.config.head_layer)  # (B, T, H)
        return [hidden[i, e.slots].float() for i, e in enumerate(encoded)]

    @torch.no_grad()
    def judge(self, windows: Sequence[Sequence[WindowItem]]) -> list[np.ndarray]:
        """Label logits (members, L) for each window, one LLM forward per window."""
        return [self.head(h).double().cpu().numpy() for h in self.slot_hidden(windows)]

    # ------------------------------------------------------------------ the merge
    @torch.no_grad()
    def combine(self, judgements: Sequence[Judgement], base_probs: Sequence[float]) -> np.ndarray:
        """The final distribution (L,) of one utterance from its judgements (up to t) and base prediction."""
        t = self.spec.t
        if not judgements:
            return np.asarray(base_probs, dtype=np.float64)
        judgements = list(judgements)[-t:]
        L = len(self.label_set)
        logits = torch.zeros((1, t, L))
        pos = torch.zeros((1, t), dtype=torch.long)
        order = torch.zeros((1, t), dtype=torch.long)
        mask = torch.zeros((1, t), dtype=torch.bool)
        for j, jd in enumerate(judgements):
            logits[0, j] = torch.as_tensor(np.asarray(jd.logits, dtype=np.float32))
            pos[0, j] = min(max(int(jd.position), 0), self.config.window - 1)
            order[0, j] = min(max(int(jd.order), 0), t - 1)
            mask[0, j] = True
        base = torch.as_tensor(np.asarray(base_probs, dtype=np.float32))[None]
        dev = self.head.weight.device
        out = self.attention(logits.to(dev), pos.to(dev), order.to(dev), mask.to(dev), base.to(dev))
        return out[0].double().cpu().numpy()


def refine_conversation(refiner: Refiner, speakers: Sequence[str], texts: Sequence[str], base_probs: np.ndarray,
                        batch_size: int = 4) -> np.ndarray:
    """Offline refinement of a whole conversation: (n, L) final distributions from base (n, L)."""
    n = len(texts)
    spec = refiner.spec
    windows = spec.windows(n)
    items = [WindowItem(speakers[i], texts[i], base_probs[i]) for i in range(n)]
    judged: list[list[Judgement]] = [[] for _ in range(n)]
    for b in range(0, len(windows), batch_size):
        chunk = windows[b : b + batch_size]
        outs = refiner.judge([[items[i] for i in w.members] for w in chunk])
        for w, logits in zip(chunk, outs):
            for row, i in enumerate(w.members):
                judged[i].append(Judgement(logits[row], w.position(i), w.index - spec.windows_of(i)[0]))
    return np.stack([refiner.combine(judged[i], base_probs[i]) for i in range(n)]) if n else np.zeros((0, base_probs.shape[1]))
