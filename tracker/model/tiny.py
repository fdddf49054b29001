"""A tiny randomly initialised causal LM with a real tokenizer, for tests.

The tokenizer is a byte-level BPE trained in-process on a small built-in corpus (the prompt's
words and every label set's words), so any text encodes without unknown tokens and label words
get tokens of their own. Nothing is downloaded.
"""

from __future__ import annotations

import torch

from tracker.labels import LABEL_SETS

_CORPUS_LINES = [
    "Conversation so far:",
    "Current utterance:",
    "Which emotion does the speaker express in the current utterance?",
    "Choose one of the following labels.",
    "Answer:",
    "<Multimodal> </Multimodal>",
    "Monica: Oh my God, he is lost it. He is totally lost it.",
    "Phoebe: What? I do not know what you are talking about.",
    "Ross: Well, I guess that is fine, thank you very much.",
    "Rachel: No way! Are you serious? That is so great!",
    "Joey: How you doing? Hey, hey, come on, tell me.",
    "Chandler: Could this be any more awkward? Yeah, okay.",
    "Kids are talking by the door. Dogs are sitting by the door.",
    "the a an and or of to in on at for with is are was were be been I you he she it we they",
]


def _corpus() -> list[str]:
    lines = list(_CORPUS_LINES)
    for label_set in LABEL_SETS.values():
        words = " ".join(label_set.words)
        lines += [f"Answer: {w}" for w in label_set.words] * 20 + [words] * 20
    return lines * 5


def build_tiny_tokenizer(vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", padding_side="right"
    )


def build_tiny_backbone(seed: int = 0, hidden_size: int = 64, num_layers: int = 2):
    """A 2-layer Llama (hidden 64) with random weights and its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model, tokenizer
