"""EmotionRecognizer: frozen LLM + MSE-Adapter + prompt -> a label distribution in one forward pass.

The label distribution is read at the answer position: the LLM's final hidden state there is
multiplied by the LM-head rows of the label words only (the same numbers the full LM head would
give for those tokens, without computing a 262k-wide vocabulary), then soft-maxed over the label
set. No text is generated, so there is nothing to parse and no parse failure.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch import nn

from tracker.config import ConfigError, load_dataclass, load_yaml, to_dict
from tracker.labels import LabelSet, get_label_set
from tracker.model import checkpoint as ckpt
from tracker.model.adapter import AdapterConfig, ModalityBatch, MSEAdapter, collate_modalities
from tracker.model.backbone import DEFAULT_BACKBONE, Backbone, load_backbone
from tracker.types import UtteranceInput
from tracker.model.llm_layers import EarlyExit, decoder_layers, final_norm
from tracker.model.prompt import EncodedPrompt, PromptBuilder, PromptConfig


@dataclass
class RecognizerConfig:
    """Everything needed to rebuild a recognizer: backbone, label set, adapter and prompt."""

    backbone: str = DEFAULT_BACKBONE  # gemma3-270m, tiny, or a local Hugging Face model directory
    dtype: str = "auto"  # auto (bf16 where supported, else fp32), fp32, bf16
    label_set: str = "meld7"  # meld7, ravdess8, emorynlp7, sentiment3, msa7
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    # How the label distribution is read at the answer position:
    #   lm_head: the frozen LM-head rows of the label words (the LLM "answers" with a label word);
    #   linear:  a small trainable linear head, initialised from those rows, on the normed hidden state.
    head: Literal["lm_head", "linear"] = "lm_head"
    # Which hidden state feeds the head: 0 = the LLM's last layer; k = the output of decoder layer k
    # (the forward stops there, so a middle layer is also cheaper). Middle layers often carry more.
    head_layer: int = 0
    # The linear head starts as head_init_scale x the label words' LM-head rows. 1 = zero-shot scoring;
    # smaller values soften it: on a middle layer those rows give very confident, mostly wrong logits
    # (initial loss 3-7), which slows early training; 0 starts from a uniform distribution.
    head_init_scale: float = 1.0
    # Probabilities are softmax(logits / temperature). 1 = as trained; `tracker calibrate` fits it on a
    # dev set after training (tracker.training.calibrate) so that confidences match accuracies.
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature!r}")
        if self.head not in ("lm_head", "linear"):
            raise ConfigError(f"head: must be lm_head or linear, got {self.head!r}")
        if self.head_layer < 0:
            raise ConfigError(f"head_layer: must be >= 0 (0 = last layer), got {self.head_layer}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"dtype: must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        try:
            get_label_set(self.label_set)
        except KeyError as exc:
            raise ConfigError(f"label_set: {exc.args[0]}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RecognizerConfig":
        return load_yaml(cls, path)


@dataclass
class Prediction:
    """A label distribution for one utterance."""

    label: str
    probabilities: dict[str, float]
    score: float  # expected value under the label set's values (valence, or the MSA score in [-3, 3])

    @property
    def confidence(self) -> float:
        return self.probabilities[self.label]


@dataclass
class RecognizerBatch:
    """A padded batch of prompts (right padding) with adapter inputs."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    answer_index: torch.Tensor  # (B,)
    utterance_ids: torch.Tensor  # (B, U)
    utterance_mask: torch.Tensor  # (B, U)
    modalities: dict[str, ModalityBatch]
    pseudo_start: int | torch.Tensor  # one index for all rows, or (B,) when rows differ (layout context_first)
    n_pseudo: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


class EmotionRecognizer(nn.Module):
    """Labels utterances with a frozen causal LLM steered by MSE-Adapter pseudo tokens."""

    def __init__(self, backbone: Backbone, config: RecognizerConfig | None = None, label_set: LabelSet | None = None):
        super().__init__()
        config = dataclasses.replace(config or RecognizerConfig())
        if config.adapter.llm_hidden_size == 0:
            config.adapter = dataclasses.replace(config.adapter, llm_hidden_size=backbone.hidden_size)
        if config.adapter.llm_hidden_size != backbone.hidden_size:
            raise ckpt.CheckpointError(
                f"adapter is built for LLM hidden size {config.adapter.llm_hidden_size}, "
                f"but backbone {backbone.name!r} has hidden size {backbone.hidden_size}"
            )
        self.config = config
        self.backbone = backbone
        self.llm = backbone.model  # registered as a submodule; frozen
        # the keyword the LLM's forward takes its key/value cache by: `cache` in transformers 5.2x, `past_key_values` before
        self._cache_kwarg = "cache" if "cache" in inspect.signature(self.llm.base_model.forward).parameters else "past_key_values"
        self.label_set = label_set or get_label_set(config.label_set)
        self.adapter = MSEAdapter(config.adapter)
        self.prompt = PromptBuilder(backbone.tokenizer, self.label_set, config.prompt, config.adapter.n_pseudo_tokens)
        self.register_buffer("label_token_ids", torch.tensor(self.prompt.label_token_ids, dtype=torch.long), persistent=False)
        self.modality_names = [m.name for m in config.adapter.modalities]
        self.modality_dims = {m.name: m.feature_dim for m in config.adapter.modalities}
        if config.head_layer > backbone.num_layers:
            raise ConfigError(f"head_layer: {config.head_layer} exceeds the backbone's {backbone.num_layers} layers")
        self.label_head = None
        if config.head == "linear":
            rows = self.llm.get_output_embeddings().weight[self.label_token_ids].detach().float()
            self.label_head = nn.Linear(backbone.hidden_size, len(self.label_set))
            with torch.no_grad():
                self.label_head.weight.copy_(rows * config.head_init_scale)  # 1.0: the zero-shot LM-head scoring
                self.label_head.bias.zero_()
        if config.adapter.normalize_pseudo_tokens:
            with torch.no_grad():  # mean norm of the embedding rows the LLM sees (Gemma's include sqrt(H))
                sample = torch.arange(0, min(50_000, len(backbone.tokenizer)), 7, device=backbone.device)
                self.adapter.pseudo_token_norm.fill_(float(backbone.embed(sample).float().norm(dim=-1).mean()))
        self.adapter.to(backbone.device)
        if self.label_head is not None:
            self.label_head.to(backbone.device)
        self.label_token_ids = self.label_token_ids.to(backbone.device)
        self.eval()  # inference by default; a trainer calls .train()

    # ------------------------------------------------------------------ construction and persistence
    @classmethod
    def from_config(cls, config: RecognizerConfig, backbone: Backbone | None = None, device: str = "cpu") -> "EmotionRecognizer":
        backbone = backbone or load_backbone(config.backbone, dtype=config.dtype, device=device)
        return cls(backbone, config)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` (backbone, hidden size, label set, adapter, prompt) and ``model.safetensors``."""
        payload = {
            "backbone": self.backbone.name,
            "llm_hidden_size": self.backbone.hidden_size,
            "label_set": self.label_set.to_dict(),
            "recognizer": to_dict(self.config),
        }
        return ckpt.write_checkpoint(directory, payload, self.trainable_state_dict())

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, backbone: Backbone | None = None, device: str = "cpu", dtype: str | None = None
    ) -> "EmotionRecognizer":
        """Load an adapter checkpoint, onto `backbone` or onto the backbone its config names."""
        data = ckpt.read_config(directory)
        try:
            config = load_dataclass(RecognizerConfig, data["recognizer"])
            label_set = LabelSet.from_dict(data["label_set"])
            hidden = int(data["llm_hidden_size"])
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise ckpt.CheckpointError(f"{Path(directory) / ckpt.CONFIG_NAME}: invalid adapter config: {exc}") from None
        if dtype is not None:
            config.dtype = dtype
        if backbone is None:
            backbone = load_backbone(config.backbone, dtype=config.dtype, device=device)
        if backbone.hidden_size != hidden:
            raise ckpt.CheckpointError(
                f"checkpoint {directory} was trained on backbone {data.get('backbone')!r} with hidden size {hidden}, "
                f"but backbone {backbone.name!r} has hidden size {backbone.hidden_size}: load it onto the backbone it names"
            )
        model = cls(backbone, config, label_set=label_set)
        expected = {k: v.shape for k, v in model.trainable_state_dict().items()}
        state = ckpt.read_weights(directory, expected)
        model.load_trainable_state_dict(state)
        model.eval()
        return model

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's (and label head's) weights and buffers: all a checkpoint holds."""
        state = {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}
        if self.label_head is not None:
            state.update({f"label_head.{k}": v for k, v in self.label_head.state_dict().items()})
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
        """Load adapter (and head) weights; returns the names left at their initial values.

        ``strict=False`` (warm-starting a changed architecture, e.g. a new modality) loads every
        tensor whose name and shape match and skips the rest.
        """
        if not strict:
            own = self.trainable_state_dict()
            kept = {k: v for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
            missing = sorted(set(own) - set(kept))
            state = {**own, **kept}
        else:
            missing = []
        self.adapter.load_state_dict({k[len("adapter."):]: v for k, v in state.items() if k.startswith("adapter.")})
        if self.label_head is not None:
            self.label_head.load_state_dict({k[len("label_head."):]: v for k, v in state.items() if k.startswith("label_head.")})
        return missing

    # ------------------------------------------------------------------ batching
    def speaker_normalizers(self) -> dict:
        """{modality: SpeakerNormalizer} for the modalities built with ``speaker_norm``; the global
        statistics are the adapter's per-feature training mean and std (saved with the weights)."""
        from tracker.audio.speaker_norm import SpeakerNormalizer

        out = {}
        for m in self.config.adapter.modalities:
            if m.speaker_norm:
                mean = getattr(self.adapter, f"norm_mean_{m.name}").detach().float().cpu().numpy()
                std = getattr(self.adapter, f"norm_std_{m.name}").detach().float().cpu().numpy()
                out[m.name] = SpeakerNormalizer(mean, std)
        return out

    def encode(self, item: UtteranceInput) -> EncodedPrompt:
        return self.prompt.encode(item.text, item.speaker, item.context)

    def collate(self, items: Sequence[UtteranceInput], encoded: Sequence[EncodedPrompt] | None = None) -> RecognizerBatch:
        """Tokenise, pad (right) and stack a list of utterances into one batch."""
        if not items:
            raise ValueError("collate: empty batch")
        encoded = list(encoded) if encoded is not None else [self.encode(it) for it in items]
        for it in items:
            for name, arr in it.features.items():
                if name not in self.modality_dims:
                    raise ValueError(f"modality {name!r} is not one this adapter was built for ({', '.join(self.modality_dims) or 'none'})")
                width = np.shape(arr)[-1] if np.ndim(arr) == 2 else None
                if width != self.modality_dims[name]:
                    raise ValueError(
                        f"modality {name!r}: expected (frames, {self.modality_dims[name]}) features, got shape {np.shape(arr)}"
                    )
        device = self.backbone.device
        ids, mask = _pad([e.input_ids for e in encoded], self.prompt.pad_token_id)
        utt, utt_mask = _pad([e.utterance_ids for e in encoded], self.prompt.pad_token_id)
        starts = {e.pseudo_start for e in encoded}
        pseudo_start: int | torch.Tensor = encoded[0].pseudo_start
        if len(starts) > 1:
            pseudo_start = torch.tensor([e.pseudo_start for e in encoded], dtype=torch.long, device=device)
        return RecognizerBatch(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            answer_index=torch.tensor([e.answer_index for e in encoded], dtype=torch.long, device=device),
            utterance_ids=utt.to(device),
            utterance_mask=utt_mask.to(device),
            modalities=collate_modalities([it.features for it in items], self.modality_names, device),
            pseudo_start=pseudo_start,
            n_pseudo=encoded[0].n_pseudo,
        )

    # ------------------------------------------------------------------ forward
    def pseudo_tokens(self, batch: RecognizerBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's pseudo tokens (B, n, H) and present-modality mask (B, M)."""
        with torch.no_grad():
            text_embeds = self.backbone.embed(batch.utterance_ids)  # (B, U, H), frozen
        return self.adapter(text_embeds, batch.utterance_mask, batch.modalities)

    def input_embeddings(self, batch: RecognizerBatch) -> torch.Tensor:
        """Prompt embeddings with the pseudo-token slots filled in: (B, T, H)."""
        with torch.no_grad():
            embeds = self.backbone.embed(batch.input_ids)  # (B, T, H)
        if batch.n_pseudo == 0:
            return embeds
        pseudo, _ = self.pseudo_tokens(batch)
        s, n = batch.pseudo_start, batch.n_pseudo
        if isinstance(s, int):
            return torch.cat([embeds[:, :s], pseudo.to(embeds.dtype), embeds[:, s + n :]], dim=1)
        rows = torch.arange(embeds.shape[0], device=embeds.device)[:, None]  # (B, 1)
        cols = s.to(embeds.device)[:, None] + torch.arange(n, device=embeds.device)  # (B, n)
        embeds = embeds.clone()
        embeds[rows, cols] = pseudo.to(embeds.dtype)  # per-row slots; gradients flow to the adapter
        return embeds

    def _decoder_layers(self) -> nn.ModuleList:
        return decoder_layers(self.llm)

    def _final_norm(self) -> nn.Module:
        return final_norm(self.llm)

    def answer_hidden(self, batch: RecognizerBatch) -> torch.Tensor:
        """The (normed) hidden state at each row's answer position: (B, H)."""
        embeds = self.input_embeddings(batch)
        rows = torch.arange(embeds.shape[0], device=embeds.device)
        return self.head_hidden(embeds, batch.attention_mask, rows=rows, index=batch.answer_index)

    @property
    def cached_layers(self) -> int:
        """How many decoder layers the head needs (and a key/value cache holds)."""
        return self.config.head_layer or self.backbone.num_layers

    def head_hidden(
        self,
        embeds: torch.Tensor,
        attention_mask,
        rows: torch.Tensor,
        index: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
    ) -> torch.Tensor:
        """Run the LLM on (B, T, H) embeddings and return the normed hidden state at (rows, index): (B, H).

        With ``head_layer = k`` the forward stops after decoder layer k (a hook captures its output
        and ends the pass), and the LLM's final norm is applied to that state. `attention_mask` is
        a 2D padding mask, or prepared 4D masks (a dict by layer type for hybrid models) together
        with `position_ids` and `past_key_values` (tracker.model.incremental).
        """
        k = self.config.head_layer
        use_cache = past_key_values is not None
        kwargs = {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": use_cache, self._cache_kwarg: past_key_values}
        if k == 0:
            out = self.llm.base_model(**kwargs)
            return out.last_hidden_state[rows, index]  # (B, H)
        captured: dict[str, torch.Tensor] = {}

        def stop_here(_module, _inputs, output):
            captured["h"] = output[0] if isinstance(output, tuple) else output
            raise EarlyExit

        handle = self._decoder_layers()[k - 1].register_forward_hook(stop_here)
        try:
            self.llm.base_model(**kwargs)
        except EarlyExit:
            pass
        finally:
            handle.remove()
        hidden = captured["h"][rows, index]  # (B, H)
        return self._final_norm()(hidden)

    @torch.inference_mode()
    def layer_states(self, batch: RecognizerBatch, layers: Sequence[int]) -> torch.Tensor:
        """The normed answer-position states after each decoder layer of `layers` (1-based), from one
        forward that stops after the deepest of them: (B, len(layers), H). For readout probes
        (bench/head_readout.py): the state of layer ``head_layer`` is what the head reads."""
        n = self.backbone.num_layers
        if not layers or any(not 1 <= k <= n for k in layers):
            raise ValueError(f"layers: each must be between 1 and {n}, got {list(layers)}")
        embeds = self.input_embeddings(batch)
        rows = torch.arange(embeds.shape[0], device=embeds.device)
        captured: dict[int, torch.Tensor] = {}
        deepest = max(layers)
        decoder = self._decoder_layers()

        def keep(k: int):
            def hook(_module, _inputs, output):
                captured[k] = (output[0] if isinstance(output, tuple) else output)[rows, batch.answer_index]  # (B, H)
                if k == deepest:
                    raise EarlyExit
            return hook

        handles = [decoder[k - 1].register_forward_hook(keep(k)) for k in sorted(set(layers))]
        try:
            self.llm.base_model(inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False)
        except EarlyExit:
            pass
        finally:
            for h in handles:
                h.remove()
        norm = self._final_norm()
        return torch.stack([norm(captured[k]) for k in layers], dim=1)  # (B, len(layers), H)

    def label_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the label set from answer-position hidden states (B, H) -> (B, L).

        ``lm_head``: the LM head's rows of the label words only, the same numbers the full head
        would give for those tokens.
        """
        if self.label_head is not None:
            return self.label_head(hidden.float())
        head = self.llm.get_output_embeddings()
        weight = head.weight[self.label_token_ids]  # (L, H)
        logits = hidden.float() @ weight.float().T  # (B, L)
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[self.label_token_ids].float()
        cap = getattr(self.backbone.text_config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, batch: RecognizerBatch) -> torch.Tensor:
        """Logits over the label set for each row: (B, L)."""
        return self.label_logits(self.answer_hidden(batch))

    def probabilities(self, logits: torch.Tensor) -> np.ndarray:
        """The label distribution that leaves the recognizer: softmax(logits / temperature), (B, L) float64.

        Every path that hands probabilities out (batch prediction, the incremental service path,
        replay) goes through here, so a calibrated temperature applies everywhere at once.
        """
        return torch.softmax(logits.float() / self.config.temperature, dim=-1).double().cpu().numpy()

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def predict_proba(self, items: Sequence[UtteranceInput], batch_size: int = 8) -> np.ndarray:
        """Class probabilities (N, L), batched; rows are grouped by length to pad little."""
        was_training = self.training
        if was_training:  # (eval() walks every module of the LLM: not per call when already in eval mode)
            self.eval()
        try:
            encoded = [self.encode(it) for it in items]
            order = sorted(range(len(items)), key=lambda i: len(encoded[i].input_ids))
            out = np.zeros((len(items), len(self.label_set)), dtype=np.float64)
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = self.collate([items[i] for i in idx], [encoded[i] for i in idx])
                out[idx] = self.probabilities(self.forward(batch))
            return out
        finally:
            if was_training:
                self.train(True)

    def to_predictions(self, probs: np.ndarray) -> list[Prediction]:
        labels = self.label_set.labels
        values = np.asarray(self.label_set.values)
        return [
            Prediction(
                label=labels[int(row.argmax())],
                probabilities={lab: float(p) for lab, p in zip(labels, row)},
                score=float(row @ values),
            )
            for row in probs
        ]

    def predict(self, items: Sequence[UtteranceInput], batch_size: int = 8) -> list[Prediction]:
        return self.to_predictions(self.predict_proba(items, batch_size))

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> "EmotionRecognizer":
        """Only the adapter ever trains; the LLM stays in eval mode (no dropout) and frozen."""
        super().train(mode)
        self.llm.eval()
        return self
