"""Incremental labelling: keep each conversation's prompt-prefix key/value cache between utterances.

With ``layout: context_first`` a prompt is ``<bos> context-lines | <Multimodal> P..P </Multimodal>
utterance instruction Answer:``; everything before ``|`` (``EncodedPrompt.prefix_len`` tokens)
depends on the past turns only. For a new utterance of a conversation whose cache holds a prefix
of that prefix, the LLM runs over the missing context line(s) and the utterance-specific suffix
only, attending to the cached keys/values. Afterwards the cache is extended by the new context
lines' keys/values; the suffix's are dropped, so the stored cache never depends on an utterance.
A cache that does not match (the window slid, the entry was evicted, the history differs) is
rebuilt from the prompt itself, so labels equal a full recomputation in every case.

Rows of different conversations share one forward: cached prefixes (lengths p_b) are left-padded
to the longest (P), new tokens (lengths n_b) are right-padded to the longest (S), each row gets
explicit positions ``p_b + t`` and a 4D mask over the P + S keys (causal on true positions, pads
masked, sliding-window layers masked to their window), so every row computes exactly what it
would alone. Only the layers the label head reads are cached (``head_layer``).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Sequence

import numpy as np
import torch

from tracker.types import UtteranceInput
from tracker.model.kv_cache import KVCacheStore, PrefixEntry
from tracker.model.prompt import EncodedPrompt

DEFAULT_CACHE_BYTES = 1 << 30  # 1 GiB of prefix caches per replica


@dataclasses.dataclass
class _Row:
    key: str
    item: UtteranceInput
    encoded: EncodedPrompt
    cached: PrefixEntry | None  # the entry reused, or None (built from scratch)

    @property
    def p(self) -> int:  # cached prefix length
        return len(self.cached) if self.cached is not None else 0


class IncrementalLabeler:
    """Labels utterances of many live conversations, reusing each one's prefix cache."""

    def __init__(self, recognizer, cache: KVCacheStore | None = None, max_cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.recognizer = recognizer
        self.cache = cache if cache is not None else KVCacheStore(max_cache_bytes)
        self._lock = threading.Lock()
        cfg = recognizer.backbone.text_config
        self.attn_implementation = getattr(cfg, "_attn_implementation", None) or "sdpa"
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"incremental labelling supports sdpa and eager attention, not {self.attn_implementation!r}")
        layer_types = list(getattr(cfg, "layer_types", None) or [])
        self.hybrid = bool(layer_types)  # the model takes a mask per layer type (Gemma-3, Qwen2 ...)
        self.sliding_window = getattr(cfg, "sliding_window", None)
        if not self.hybrid and not getattr(cfg, "use_sliding_window", bool(self.sliding_window)):
            self.sliding_window = None

    # ------------------------------------------------------------------ public
    @torch.inference_mode()
    def predict_proba(self, requests: Sequence[tuple[str, UtteranceInput]], commit: bool = True) -> np.ndarray:
        """Class probabilities (N, L) for (conversation key, utterance) pairs.

        Each pair's `UtteranceInput.context` is that utterance's window of past turns (as for the
        non-incremental path). Utterances of one conversation in the same call are labelled in
        order, one forward each; different conversations share forwards. With ``commit=False``
        no cache is changed (for benchmarks that repeat a step).
        """
        rec = self.recognizer
        out = np.zeros((len(requests), len(rec.label_set)), dtype=np.float64)
        if not requests:
            return out
        was_training = rec.training
        if was_training:  # (eval() walks every module of the LLM: not per call when already in eval mode)
            rec.eval()
        try:
            with self._lock:
                for idx in self._rounds([key for key, _ in requests]):
                    out[idx] = self._forward([requests[i] for i in idx], commit)
        finally:
            if was_training:
                rec.train(True)
        return out

    def predict(self, requests: Sequence[tuple[str, UtteranceInput]]):
        return self.recognizer.to_predictions(self.predict_proba(requests))

    def forget(self, key: str) -> None:
        """Drop a conversation's cache (it ended)."""
        self.cache.pop(key)

    def entry_nbytes(self, key: str) -> int:
        entry = self.cache.get(key)
        return entry.nbytes if entry is not None else 0

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _rounds(keys: list[str]) -> list[list[int]]:
        """Split request indices into forwards where each conversation appears at most once, in order."""
        rounds: list[list[int]] = []
        seen: dict[str, int] = {}
        for i, key in enumerate(keys):
            r = seen.get(key, -1) + 1
            seen[key] = r
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(i)
        return rounds

    def _plan(self, key: str, item: UtteranceInput) -> _Row:
        encoded = self.recognizer.encode(item)
        prefix = tuple(encoded.input_ids[: encoded.prefix_len])
        entry = self.cache.get(key)
        stats = self.cache.stats
        if entry is not None and len(entry) <= len(prefix) and entry.token_ids == prefix[: len(entry)]:
            stats.hits += 1
            return _Row(key, item, encoded, entry)
        if entry is None:
            stats.misses += 1
        else:
            stats.rebuilds += 1
        return _Row(key, item, encoded, None)

    def _forward(self, requests: list[tuple[str, UtteranceInput]], commit: bool) -> np.ndarray:
        rows = [self._plan(key, item) for key, item in requests]
        out = np.zeros((len(rows), len(self.recognizer.label_set)), dtype=np.float64)
        for group in self._groups([len(r.encoded.input_ids) - r.p for r in rows]):
            out[group] = self._run([rows[i] for i in group], commit)
        return out

    @staticmethod
    def _groups(new_tokens: list[int]) -> list[list[int]]:
        """Split a batch in two forwards when that saves padding: a rebuilt prefix (~200 new tokens)
        next to rows that only need their suffix (~80) would otherwise pad every row to the longest."""
        order = sorted(range(len(new_tokens)), key=lambda i: new_tokens[i])
        n = [new_tokens[i] for i in order]
        whole = len(n) * n[-1]
        best, split = whole, 0
        for j in range(1, len(n)):
            cost = j * n[j - 1] + (len(n) - j) * n[-1]
            if cost < best:
                best, split = cost, j
        if split == 0 or best > 0.75 * whole:
            return [list(range(len(new_tokens)))]
        return [sorted(order[:split]), sorted(order[split:])]

    def _run(self, rows: list[_Row], commit: bool) -> np.ndarray:
        cache_of = lambda P, dtype, device: self._batched_cache(rows, P, dtype, device)  # noqa: E731
        logits, shifted, cache, P = self._suffix_logits(rows, cache_of)
        probs = self.recognizer.probabilities(logits)  # (B, L)
        if commit:
            self._store(rows, shifted, cache, P)
        return probs

    def _suffix_logits(self, rows: list[_Row], cache_of):
        """Label logits (B, L) of rows whose first ``r.p`` tokens are in the cache ``cache_of(P, dtype, device)``
        builds (left-padded to P); the LLM runs over each row's remaining tokens only."""
        rec = self.recognizer
        device = rec.backbone.device
        # the new tokens of each row, as an EncodedPrompt shifted by its cached length
        shifted = [
            dataclasses.replace(
                r.encoded,
                input_ids=r.encoded.input_ids[r.p :],
                pseudo_start=r.encoded.pseudo_start - r.p,
                answer_index=r.encoded.answer_index - r.p,
                prefix_len=r.encoded.prefix_len - r.p,
            )
            for r in rows
        ]
        batch = rec.collate([r.item for r in rows], shifted)
        embeds = rec.input_embeddings(batch)  # (B, S, H)
        B, S = embeds.shape[:2]
        p = torch.tensor([r.p for r in rows], dtype=torch.long, device=device)  # (B,)
        n = torch.tensor([len(s.input_ids) for s in shifted], dtype=torch.long, device=device)  # (B,)
        P = int(p.max())
        cache = cache_of(P, embeds.dtype, device)
        positions = p[:, None] + torch.arange(S, device=device)  # (B, S)
        masks = self._masks(p, n, P, S, embeds.dtype)
        hidden = rec.head_hidden(
            embeds, masks, rows=torch.arange(B, device=device), index=batch.answer_index,
            position_ids=positions, past_key_values=cache,
        )  # (B, H)
        return rec.label_logits(hidden), shifted, cache, P

    def train_logits(self, items: Sequence[UtteranceInput], encoded: Sequence[EncodedPrompt] | None = None) -> torch.Tensor:
        """Label logits (B, L) for training, equal to ``recognizer(collate(items))``, with gradients to the adapter.

        The past-turns prefix of a ``context_first`` prompt depends on no trainable parameter, so it
        runs once without autograd and only the suffix (pseudo tokens, utterance, instruction) runs
        with it: the backward pass skips the prefix, which is most of a prompt with context. No cache
        entry is read or written.
        """
        from transformers import DynamicCache

        rec = self.recognizer
        device = rec.backbone.device
        encoded = list(encoded) if encoded is not None else [rec.encode(it) for it in items]
        lengths = [e.prefix_len for e in encoded]
        P = max(lengths)
        with torch.no_grad():
            ids = torch.full((len(items), P), rec.prompt.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(items), P), dtype=torch.long)
            for b, e in enumerate(encoded):
                ids[b, : e.prefix_len] = torch.tensor(e.input_ids[: e.prefix_len])
                mask[b, : e.prefix_len] = 1
            prefix_cache = DynamicCache()
            embeds = rec.backbone.embed(ids.to(device))  # (B, P, H), right-padded prefixes
            rows = torch.arange(len(items), device=device)
            rec.head_hidden(embeds, mask.to(device), rows=rows, index=torch.zeros_like(rows), past_key_values=prefix_cache)
            data = []
            for layer in prefix_cache.layers[: rec.cached_layers]:
                k, v = torch.zeros_like(layer.keys), torch.zeros_like(layer.values)  # (B, h, P, D) left-padded
                for b, n in enumerate(lengths):
                    k[b, :, P - n :] = layer.keys[b, :, :n]
                    v[b, :, P - n :] = layer.values[b, :, :n]
                data.append((k, v))
        plan = [_Row("", it, e, PrefixEntry(tuple(e.input_ids[: e.prefix_len]), [], [])) for it, e in zip(items, encoded)]
        logits, _, _, _ = self._suffix_logits(plan, lambda P_, dtype, dev: DynamicCache(ddp_cache_data=data))
        return logits

    def _batched_cache(self, rows: list[_Row], P: int, dtype: torch.dtype, device: torch.device):
        from transformers import DynamicCache

        if P == 0:
            return DynamicCache()
        data = []
        template = next(r.cached for r in rows if r.p > 0)
        for layer in range(len(template.keys)):
            heads, _, dim = template.keys[layer].shape
            k = torch.zeros((len(rows), heads, P, dim), dtype=dtype, device=device)  # (B, h, P, D), left-padded
            v = torch.zeros_like(k)
            for b, r in enumerate(rows):
                if r.p:
                    k[b, :, P - r.p :] = r.cached.keys[layer]
                    v[b, :, P - r.p :] = r.cached.values[layer]
            data.append((k, v))
        return DynamicCache(ddp_cache_data=data)

    def _masks(self, p: torch.Tensor, n: torch.Tensor, P: int, S: int, dtype: torch.dtype):
        """4D attention masks (B, 1, S, P + S) on true positions; a dict by layer type for hybrid models."""
        device = p.device
        slot = torch.arange(P + S, device=device)[None, :]  # (1, T)
        in_cache = slot < P
        kv_pos = torch.where(in_cache, slot - (P - p[:, None]), p[:, None] + slot - P)  # (B, T)
        kv_valid = torch.where(in_cache, kv_pos >= 0, (slot - P) < n[:, None])  # (B, T)
        q_pos = p[:, None] + torch.arange(S, device=device)[None, :]  # (B, S)
        full = kv_valid[:, None, :] & (kv_pos[:, None, :] <= q_pos[:, :, None])  # (B, S, T)
        sliding = full
        if self.sliding_window:
            sliding = full & (kv_pos[:, None, :] > q_pos[:, :, None] - self.sliding_window)
        full, sliding = self._format(full[:, None], dtype), self._format(sliding[:, None], dtype)
        if self.hybrid:
            return {"full_attention": full, "sliding_attention": sliding}
        return sliding if self.sliding_window else full

    def _format(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.attn_implementation == "sdpa":
            return allowed
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)  # eager: additive

    def _store(self, rows: list[_Row], shifted: list[EncodedPrompt], cache, P: int) -> None:
        """Keep each row's cached prefix plus its new context lines; drop the utterance's own tokens."""
        for b, (r, s) in enumerate(zip(rows, shifted)):
            if s.prefix_len == 0:
                continue  # nothing new in the prefix: the entry (if any) stays as it is
            prefix = tuple(r.encoded.input_ids[: r.encoded.prefix_len])
            lo, hi = P - r.p, P + s.prefix_len
            keys = [layer.keys[b, :, lo:hi].clone() for layer in cache.layers]  # (h, p + new, D)
            values = [layer.values[b, :, lo:hi].clone() for layer in cache.layers]
            self.cache.put(r.key, PrefixEntry(prefix, keys, values))
