"""MSE-Adapter: non-text features (and text) to pseudo tokens for a frozen causal LLM.

After "MSE-Adapter: A Lightweight Plugin Endowing LLMs with the Capability to Perform Multimodal
Sentiment Analysis and Emotion Recognition" and its official code, with three deliberate changes
(each a config switch): the LayerNorm after the Text-Guide-Mixer (in the paper, not in the code);
an optional per-token expansion (the code's Linear(1, n) makes all pseudo tokens multiples of one
vector); and an optional text modality so that a text-only utterance still gets pseudo tokens that
depend on it rather than a constant soft prompt.

Data flow for a batch of B utterances (H = LLM hidden size, d = ``d_model``)::

    utterance token embeddings (B, U, H) --mean over real tokens--> Linear --> t (B, d)
    each modality m: frames (B, T_m, F_m) --norm--> LSTM --> Linear --> f_m (B, d)
    Text-Guide-Mixer:  z = LayerNorm( sum_m present_m * (f_m * t) )          (B, d)
    Multi-Scale Fusion: [MLP_{H/8}(z), MLP_{H/16}(z), MLP_{H/32}(z)] --1x1 conv--> (B, d)
    Projector: Linear(d -> H) then expansion to n pseudo tokens               (B, n, H)

A missing modality is masked out of the sum (``present_m = 0``); it never enters as zeros
posing as features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from tracker.config import ConfigError


@dataclass
class ModalityConfig:
    """A non-text modality given as a sequence of frame features (e.g. eGeMAPS LLDs, 25 per 10 ms)."""

    name: str
    feature_dim: int
    lstm_hidden: int = 64  # hidden width of the modality's sequence encoder
    lstm_layers: int = 1
    frame_pooling: int = 1  # average every k frames before the LSTM (10 ms LLDs -> k x 10 ms steps)
    # where the features come from (tracker.audio.modalities): egemaps_lld (frames, 25) every 10 ms,
    # egemaps_functionals (1, 88) per clip, or whisper_<model>_l<layer>_<mean|meanstd> (1, d or 2d) per clip
    source: str = "egemaps_lld"
    # normalise this modality per speaker against the speaker's own past utterances (tracker.audio.speaker_norm)
    speaker_norm: bool = False

    def __post_init__(self) -> None:
        from tracker.sources import parse_source

        try:
            spec = parse_source(self.source)
        except ConfigError as exc:
            raise ConfigError(f"modalities.{self.name}.source: {exc}") from None
        if spec.kind == "whisper" and self.feature_dim != spec.feature_dim:
            raise ConfigError(f"modalities.{self.name}.feature_dim: source {self.source} gives {spec.feature_dim} "
                              f"features, got {self.feature_dim}")
        if not self.name or not self.name.isidentifier():
            raise ConfigError(f"modalities.name: must be an identifier, got {self.name!r}")
        if self.feature_dim <= 0:
            raise ConfigError(f"modalities.{self.name}.feature_dim: must be > 0, got {self.feature_dim}")
        if self.lstm_hidden <= 0 or self.lstm_layers <= 0:
            raise ConfigError(f"modalities.{self.name}.lstm_hidden/lstm_layers: must be > 0")
        if self.frame_pooling < 1:
            raise ConfigError(f"modalities.{self.name}.frame_pooling: must be >= 1, got {self.frame_pooling}")


def _default_modalities() -> list[ModalityConfig]:
    return [ModalityConfig(name="audio", feature_dim=25)]


@dataclass
class AdapterConfig:
    """Hyper-parameters of the MSE-Adapter (see the module docstring for the data flow)."""

    llm_hidden_size: int = 0  # H: width of the frozen LLM's embeddings; 0 = take it from the backbone
    d_model: int = 256  # d: width of the fused feature
    modalities: list[ModalityConfig] = field(default_factory=_default_modalities)
    text_as_modality: bool = True  # the utterance text also enters the fusion through its own encoder
    text_lstm_hidden: int = 64  # hidden width of the text modality's sequence encoder
    n_pseudo_tokens: int = 8  # n: pseudo tokens handed to the LLM
    expansion: Literal["scalar", "per_token"] = "per_token"  # scalar = the official Linear(1, n)
    fusion_divisors: list[int] = field(default_factory=lambda: [8, 16, 32])  # MLP widths H/8, H/16, H/32
    mixer_layer_norm: bool = True  # LayerNorm after the Text-Guide-Mixer (paper: yes, official code: no)
    dropout: float = 0.1
    # Give each pseudo token the typical norm of the LLM's own input embeddings (times a learned gain)
    # instead of letting the projector choose it; unconstrained pseudo tokens drift to several times
    # that norm on Gemma.
    normalize_pseudo_tokens: bool = False
    # LayerNorm each modality's feature before the mixer, so that one modality (the text LSTM over
    # large-norm LLM embeddings) cannot drown another (a short audio clip) in the sum.
    modality_layer_norm: bool = False
    # > 0: a linear classifier over this many classes on each non-text modality's encoded feature,
    # for an auxiliary loss (and a warm-up of the encoders without the LLM); 0 = none.
    aux_classes: int = 0

    def __post_init__(self) -> None:
        if self.llm_hidden_size < 0:
            raise ConfigError(f"llm_hidden_size: must be >= 0, got {self.llm_hidden_size}")
        for name in ("d_model", "text_lstm_hidden"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.n_pseudo_tokens < 0:
            raise ConfigError(f"n_pseudo_tokens: must be >= 0, got {self.n_pseudo_tokens}")
        if self.expansion not in ("scalar", "per_token"):
            raise ConfigError(f"expansion: must be 'scalar' or 'per_token', got {self.expansion!r}")
        if self.aux_classes < 0:
            raise ConfigError(f"aux_classes: must be >= 0 (0 = no auxiliary classifier), got {self.aux_classes}")
        H = self.llm_hidden_size or 10**9  # unknown yet: checked again once H is set
        if not self.fusion_divisors or any(k <= 0 or H // k < 1 for k in self.fusion_divisors):
            raise ConfigError(f"fusion_divisors: each must divide H={self.llm_hidden_size} to >= 1, got {self.fusion_divisors}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must lie in [0, 1), got {self.dropout}")
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names):
            raise ConfigError(f"modalities: duplicate names {names}")
        if "text" in names:
            raise ConfigError("modalities: 'text' is reserved; use text_as_modality")


@dataclass
class ModalityBatch:
    """Padded frame features of one modality for a batch; ``lengths == 0`` marks it missing."""

    features: torch.Tensor  # (B, T, F)
    lengths: torch.Tensor  # (B,) int64

    @property
    def present(self) -> torch.Tensor:
        return self.lengths > 0  # (B,)


class SequenceEncoder(nn.Module):
    """LSTM over frames, last hidden state, dropout, Linear to d (the official code's sub-network)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int = 1, dropout: float = 0.1):
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden, num_layers=layers, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # x: (B, T, F); rows of length 0 are run with length 1 and must be masked by the caller
        safe = lengths.clamp(min=1).cpu()
        packed = pack_padded_sequence(x, safe, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)  # h_n: (layers, B, hidden)
        return self.out(self.dropout(h_n[-1]))  # (B, d)


class MultiScaleFusion(nn.Module):
    """Bottleneck MLPs d -> H/k -> d (GELU) for each divisor k, merged by a 1x1 convolution."""

    def __init__(self, d_model: int, hidden_size: int, divisors: list[int], dropout: float = 0.1):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Linear(d_model, hidden_size // k), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_size // k, d_model)
            )
            for k in divisors
        )
        self.merge = nn.Conv1d(len(divisors), 1, kernel_size=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack([branch(z) for branch in self.branches], dim=1)  # (B, scales, d)
        return self.merge(stacked).squeeze(1)  # (B, d)


class Projector(nn.Module):
    """Linear(d -> H), then expansion to n pseudo tokens.

    ``scalar``: the official Linear(1, n): token_i = w_i * p + b_i (all tokens collinear).
    ``per_token``: each pseudo token has its own Linear(d -> H) projection.
    """

    def __init__(self, d_model: int, hidden_size: int, n_tokens: int, expansion: str):
        super().__init__()
        self.n_tokens = n_tokens
        self.hidden_size = hidden_size
        self.expansion = expansion
        if n_tokens == 0:
            return  # no pseudo tokens: the LLM sees the plain prompt
        if expansion == "scalar":
            self.proj = nn.Linear(d_model, hidden_size)
            self.expand = nn.Linear(1, n_tokens)
        else:
            self.proj = nn.Linear(d_model, hidden_size * n_tokens)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.n_tokens == 0:
            return z.new_zeros(z.shape[0], 0, self.hidden_size)
        if self.expansion == "scalar":
            p = self.proj(z)  # (B, H)
            return self.expand(p.unsqueeze(-1)).transpose(1, 2)  # (B, n, H)
        return self.proj(z).view(z.shape[0], self.n_tokens, self.hidden_size)  # (B, n, H)


class MSEAdapter(nn.Module):
    """The trainable plugin: text + optional non-text features -> (B, n, H) pseudo tokens."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        if config.llm_hidden_size <= 0:
            raise ConfigError("llm_hidden_size: must be set (> 0) before building the adapter")
        self.config = config
        H, d = config.llm_hidden_size, config.d_model
        self.text_proj = nn.Linear(H, d)
        self.encoders = nn.ModuleDict(
            {
                m.name: SequenceEncoder(m.feature_dim, m.lstm_hidden, d, m.lstm_layers, config.dropout)
                for m in config.modalities
            }
        )
        # Per-feature standardisation of each modality, fitted on training data and saved with the weights.
        for m in config.modalities:
            self.register_buffer(f"norm_mean_{m.name}", torch.zeros(m.feature_dim))
            self.register_buffer(f"norm_std_{m.name}", torch.ones(m.feature_dim))
        self.frame_pooling = {m.name: m.frame_pooling for m in config.modalities}
        self.text_encoder = (
            SequenceEncoder(H, config.text_lstm_hidden, d, 1, config.dropout) if config.text_as_modality else None
        )
        self.mixer_norm = nn.LayerNorm(d) if config.mixer_layer_norm else nn.Identity()
        names = (["text"] if config.text_as_modality else []) + [m.name for m in config.modalities]
        self.modality_norms = nn.ModuleDict({n: nn.LayerNorm(d) for n in names}) if config.modality_layer_norm else None
        self.fusion = MultiScaleFusion(d, H, config.fusion_divisors, config.dropout)
        self.projector = Projector(d, H, config.n_pseudo_tokens, config.expansion)
        if config.normalize_pseudo_tokens:
            self.register_buffer("pseudo_token_norm", torch.tensor(1.0))  # set from the LLM's embeddings
            self.pseudo_gain = nn.Parameter(torch.ones(()))
        self.aux_heads = (
            nn.ModuleDict({m.name: nn.Linear(d, config.aux_classes) for m in config.modalities}) if config.aux_classes else None
        )

    def set_feature_normalisation(self, modality: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        getattr(self, f"norm_mean_{modality}").copy_(mean)
        getattr(self, f"norm_std_{modality}").copy_(std.clamp(min=1e-6))

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _norm(self, name: str, feature: torch.Tensor) -> torch.Tensor:
        return self.modality_norms[name](feature) if self.modality_norms is not None else feature

    def encode_modalities(self, modalities: Mapping[str, ModalityBatch]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each given non-text modality's encoded feature (B, d) and its present mask (B,)."""
        unknown = set(modalities) - set(self.encoders)
        if unknown:
            raise ValueError(f"adapter got modalities {sorted(unknown)} it was not built for ({sorted(self.encoders)})")
        dtype = self.text_proj.weight.dtype
        out = {}
        for name, batch in modalities.items():
            feats = batch.features.to(dtype)
            feats = (feats - getattr(self, f"norm_mean_{name}")) / getattr(self, f"norm_std_{name}")
            feats, lengths = pool_frames(feats, batch.lengths, self.frame_pooling[name])
            out[name] = (self.encoders[name](feats, lengths), batch.present.to(feats.device))  # (B, d), (B,)
        return out

    def aux_logits(self, modalities: Mapping[str, ModalityBatch]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The auxiliary classifiers' logits (B, aux_classes) and present masks (B,), per given modality.

        They read the same encoded features the mixer does, so an auxiliary loss on them teaches the
        acoustic encoders to separate emotions even while the path through the LLM is still weak.
        """
        if self.aux_heads is None:
            raise ValueError("aux_logits: this adapter has no auxiliary classifier (aux_classes is 0)")
        return {name: (self.aux_heads[name](f), present) for name, (f, present) in self.encode_modalities(modalities).items()}

    def forward(
        self,
        text_embeds: torch.Tensor,  # (B, U, H) frozen input embeddings of the utterance tokens
        text_mask: torch.Tensor,  # (B, U) 1 for real tokens
        modalities: Mapping[str, ModalityBatch] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the pseudo tokens (B, n, H) and which modalities were present (B, M)."""
        modalities = modalities or {}
        dtype = self.text_proj.weight.dtype
        x = text_embeds.to(dtype)
        mask = text_mask.to(dtype).unsqueeze(-1)  # (B, U, 1)
        pooled = (x * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
        t = self.text_proj(pooled)  # (B, d)

        present_cols: list[torch.Tensor] = []
        fused = torch.zeros_like(t)  # (B, d)
        if self.text_encoder is not None:
            text_lengths = text_mask.sum(1).long()
            present = text_lengths > 0
            f_text = self._norm("text", self.text_encoder(x, text_lengths))
            fused = fused + present.unsqueeze(-1).to(dtype) * (f_text * t)
            present_cols.append(present)
        encoded = self.encode_modalities(modalities)
        for name in self.encoders:
            if name not in encoded:
                present_cols.append(torch.zeros(t.shape[0], dtype=torch.bool, device=t.device))
                continue
            f_m, present = encoded[name]
            fused = fused + present.unsqueeze(-1).to(dtype) * (self._norm(name, f_m) * t)
            present_cols.append(present)
        z = self.mixer_norm(fused)
        z = self.fusion(z)  # (B, d)
        pseudo = self.projector(z)  # (B, n, H)
        if self.config.normalize_pseudo_tokens:
            unit = pseudo / pseudo.norm(dim=-1, keepdim=True).clamp(min=1e-6)
            pseudo = unit * (self.pseudo_token_norm * self.pseudo_gain)
        present_mask = torch.stack(present_cols, dim=1) if present_cols else torch.zeros(t.shape[0], 0, dtype=torch.bool)
        return pseudo, present_mask


def pool_frames(feats: torch.Tensor, lengths: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average non-overlapping groups of k frames: (B, T, F) -> (B, ceil(T/k), F), padding excluded."""
    if k == 1:
        return feats, lengths
    B, T, F = feats.shape
    steps = -(-T // k)
    mask = (torch.arange(T, device=feats.device)[None, :] < lengths[:, None].to(feats.device)).to(feats.dtype)  # (B, T)
    pad = steps * k - T
    x = torch.nn.functional.pad(feats * mask[..., None], (0, 0, 0, pad)).view(B, steps, k, F).sum(2)
    n = torch.nn.functional.pad(mask, (0, pad)).view(B, steps, k).sum(2).clamp(min=1.0)
    return x / n[..., None], -(-lengths // k)


def collate_modalities(
    per_item: list[Mapping[str, "object"]], names: list[str], device: torch.device | str = "cpu"
) -> dict[str, ModalityBatch]:
    """Pad per-utterance frame arrays ``{name: (T, F) array}`` into ModalityBatch tensors.

    A modality absent from every item is left out entirely; absent from some items it gets
    length 0 in those rows (masked in the adapter).
    """
    out: dict[str, ModalityBatch] = {}
    for name in names:
        arrays = [item.get(name) for item in per_item]
        if all(a is None for a in arrays):
            continue
        dims = {torch.as_tensor(a).shape[-1] for a in arrays if a is not None}
        if len(dims) != 1:
            raise ValueError(f"modality {name!r}: items disagree on feature width {sorted(dims)}")
        dim = dims.pop()
        lengths = [0 if a is None else int(torch.as_tensor(a).shape[0]) for a in arrays]
        T = max(1, max(lengths))
        feats = torch.zeros(len(arrays), T, dim)
        for i, a in enumerate(arrays):
            if a is not None and lengths[i] > 0:
                t = torch.as_tensor(a, dtype=torch.float32)
                if t.ndim != 2:
                    raise ValueError(f"modality {name!r}: expected (frames, features), got shape {tuple(t.shape)}")
                if not torch.isfinite(t).all():
                    raise ValueError(f"modality {name!r}: features contain NaN or infinity")
                feats[i, : lengths[i]] = t
        out[name] = ModalityBatch(features=feats.to(device), lengths=torch.tensor(lengths, dtype=torch.long, device=device))
    return out
