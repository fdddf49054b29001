"""How labelling cost scales: with the conversation's length, with batching, against a reference-style path and the hardware.

Usage (real model; loads Gemma, so take the heavy-job lock):
    flock /tmp/tracker-heavy.lock python bench/scaling.py [--backbone gemma3-270m] [--checkpoint default]
        [--max-turns 16 --min-turns 8 --line-cap 48] [--points 1 10 50 200] [--batches 1 4 16 32] [--n-ref 48]
        [--reference-checkpoint ~/.cache/tracker/ablations/ablation-lm-head/best]

Every figure comes from this one run, side by side:
  1. ms per utterance at utterance 1, 10, 50, 200 of one long conversation (MELD dev dialogues in
     order, as one stream): incremental (prefix KV cache), full recomputation of the same window,
     and full recomputation of the whole history (no window);
  2. utterances/s at batch 1, 4, 16, 32 (that many live conversations labelled per forward),
     incremental against full recomputation;
  3. the MSE-Adapter reference style (one utterance per forward, padded, greedy generation of the
     label, parse the text) against the tracker's path on the same MELD dev utterances: speed ratio,
     label agreement and accuracy;
  4. achieved FLOP/s (torch's FLOP counter over a timed forward) against measured matmul FLOP/s;
  5. peak resident memory of the process and bytes per cached conversation.
The model under test is the shipped adapter's weights in a ``context_first`` prompt layout (the
speed does not depend on training; its labels do, so accuracy is reported for the shipped layout).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from tracker.data import load_dataset
from tracker.model.backbone import load_backbone
from tracker.context_window import window_turns
from tracker.model.incremental import IncrementalLabeler
from tracker.types import Turn, UtteranceInput
from tracker.model.prompt import PromptConfig
from tracker.model.recognizer import EmotionRecognizer, RecognizerConfig


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int = 1) -> float:
    """Median seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops(dtype: torch.dtype, seconds: float = 1.5) -> float:
    """The practical limit: FLOP/s of large square matmuls in the model's dtype, best of sizes."""
    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            a @ b
            count += 1
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start))
    return best


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------- models and data
def build_models(args) -> tuple[EmotionRecognizer, EmotionRecognizer, EmotionRecognizer, str]:
    """(shipped as shipped, shipped weights in context_first with the window, same with the whole history)."""
    backbone = load_backbone(args.backbone, dtype=args.dtype)
    if args.checkpoint == "none":
        torch.manual_seed(0)
        shipped = EmotionRecognizer(backbone, RecognizerConfig(backbone=args.backbone, head="linear", head_layer=args.head_layer))
        what = f"untrained adapter, linear head on layer {args.head_layer}"
    else:
        from tracker.model.default import default_checkpoint

        path = default_checkpoint() if args.checkpoint == "default" else args.checkpoint
        shipped = EmotionRecognizer.from_pretrained(path, backbone=backbone)
        what = f"adapter weights of {path} (head {shipped.config.head}, head_layer {shipped.config.head_layer})"

    def variant(prompt: PromptConfig) -> EmotionRecognizer:
        rec = EmotionRecognizer(backbone, dataclasses.replace(shipped.config, prompt=prompt))
        rec.load_trainable_state_dict(shipped.trainable_state_dict())
        return rec

    header = 16  # "Conversation so far:" is a few tokens; room to spare
    own = shipped.config.prompt
    if own.layout == "context_first" and args.max_turns is None:  # a model trained for the cache: its own window
        args.max_turns, args.min_turns, args.line_cap = own.context_turns, own.context_min_turns or own.context_turns, own.max_context_line_tokens
        windowed = variant(own)
    else:
        args.max_turns = args.max_turns or 16
        args.min_turns = args.min_turns or 8
        args.line_cap = args.line_cap or 48
        windowed = variant(dataclasses.replace(
            own, layout="context_first", context_turns=args.max_turns, context_min_turns=args.min_turns,
            max_context_line_tokens=args.line_cap, max_context_tokens=header + args.max_turns * args.line_cap))
    history = max(args.points) + 1
    everything = variant(dataclasses.replace(
        windowed.config.prompt, context_turns=history, context_min_turns=None, max_context_tokens=header + history * args.line_cap))
    if own.layout == "context_first":
        what += "; trained in this layout"
    return shipped, windowed, everything, what


def long_stream(n: int) -> list[Turn]:
    """MELD dev dialogues in order, as one conversation of at least n turns."""
    turns: list[Turn] = []
    for conv in load_dataset("meld:dev"):
        turns += [Turn(u.speaker, u.text) for u in conv]
        if len(turns) >= n:
            return turns[:n]
    return (turns * (n // max(1, len(turns)) + 1))[:n]


def items_for(turns: list[Turn], prompt: PromptConfig, offset: int = 0) -> list[UtteranceInput]:
    """Utterances of a stream starting at `offset`, each with its window of past turns."""
    out = []
    for i, t in enumerate(turns):
        ctx = window_turns(turns[:i], i, prompt.context_turns, prompt.context_min_turns)
        out.append(UtteranceInput(t.text, t.speaker, tuple(ctx)))
    return out[offset:]


# ---------------------------------------------------------------------------- 1. growth
def growth(args, windowed: EmotionRecognizer, everything: EmotionRecognizer) -> dict:
    n = max(args.points)
    turns = long_stream(n)
    items = items_for(turns, windowed.config.prompt)
    whole = items_for(turns, everything.config.prompt)
    labeler = IncrementalLabeler(windowed)
    rows, walk = {}, []
    for i, item in enumerate(items):
        number = i + 1  # utterance 1 has no past
        if number in args.points:
            labeler.predict_proba([("long", item)], commit=False)  # warm-up of this shape
            windowed.predict_proba([item], batch_size=1)
            inc = timed(lambda: labeler.predict_proba([("long", item)], commit=False), args.repeats)
            full = timed(lambda: windowed.predict_proba([item], batch_size=1), args.repeats)
            hist = timed(lambda: everything.predict_proba([whole[i]], batch_size=1), 1)
            rows[number] = {"incremental_ms": 1000 * inc, "full_window_ms": 1000 * full, "full_history_ms": 1000 * hist,
                            "prompt_tokens": len(windowed.encode(item).input_ids),
                            "history_prompt_tokens": len(everything.encode(whole[i]).input_ids)}
        start = time.perf_counter()
        labeler.predict_proba([("long", item)])
        walk.append(time.perf_counter() - start)
    stats = labeler.cache.stats
    return {"points": rows, "walk_mean_ms": 1000 * float(np.mean(walk)), "walk_median_ms": 1000 * float(np.median(walk)),
            "rebuilds": stats.rebuilds, "entry_bytes": labeler.entry_nbytes("long"),
            "entry_tokens": len(labeler.cache.get("long"))}


# ---------------------------------------------------------------------------- 2. batching
def batching(args, windowed: EmotionRecognizer) -> dict:
    prompt = windowed.config.prompt
    step = prompt.context_turns - (prompt.context_min_turns if prompt.context_min_turns is not None else prompt.context_turns) + 1
    rounds_total = args.batch_items
    turns = long_stream(prompt.context_turns + step + rounds_total + max(args.batches) * 3 + 8)
    out = {}
    for B in args.batches:
        rounds = max(2, rounds_total // B)
        # conversation c is the stream seen from offset 3c, and sits at position start_c of its own window cycle
        convs = [items_for(turns[3 * c :], prompt) for c in range(B)]
        starts = [prompt.context_turns + (c % step) for c in range(B)]
        labeler = IncrementalLabeler(windowed)
        labeler.predict_proba([(f"c{c}", convs[c][starts[c]]) for c in range(B)])  # caches built: the service's steady state
        t0 = time.perf_counter()
        for r in range(1, rounds + 1):
            labeler.predict_proba([(f"c{c}", convs[c][starts[c] + r]) for c in range(B)])
        inc = (time.perf_counter() - t0) / (rounds * B)
        probe = [(f"c{c}", convs[c][starts[c] + rounds + 1]) for c in range(B)]
        flops = count_flops(lambda: labeler.predict_proba(probe, commit=False))
        secs = timed(lambda: labeler.predict_proba(probe, commit=False), 2)
        full_items = [convs[c][starts[c] + r] for r in range(1, max(1, rounds // 2) + 1) for c in range(B)]
        full = timed(lambda: windowed.predict_proba(full_items, batch_size=B), 1) / len(full_items)
        full_flops = count_flops(lambda: windowed.predict_proba(full_items[:B], batch_size=B))
        full_secs = timed(lambda: windowed.predict_proba(full_items[:B], batch_size=B), 1)
        out[B] = {"incremental_utt_s": 1 / inc, "full_utt_s": 1 / full, "rounds": rounds,
                  "incremental_flop_s": flops / secs, "full_flop_s": full_flops / full_secs,
                  "cache_bytes": labeler.cache.nbytes, "cached_conversations": len(labeler.cache)}
    return out


# ---------------------------------------------------------------------------- 3. reference style
def parse_label(text: str, words: list[str]) -> int | None:
    """The first label word in generated text (the reference code's parsing), or None."""
    found = [(m.start(), i) for i, w in enumerate(words) for m in [re.search(rf"\b{re.escape(w)}\b", text.lower())] if m]
    return min(found)[1] if found else None


class FirstTokenIsALabel:
    """A logits processor: the first generated token must be one of the label words' tokens.

    The reference trains the LLM's full-vocabulary answer with an LM loss, so its greedy answer is a
    label word; this repository's LM-head readout is trained as a softmax over the label words'
    rows only, so unconstrained generation starts with whatever else scores highest (a newline).
    Restricting step one to the label tokens gives the reference path the same decision at the
    same cost (one masked row per step).
    """

    def __init__(self, token_ids: list[int]):
        self.token_ids = torch.tensor(token_ids)
        self.step = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.step += 1
        if self.step > 1:
            return scores
        masked = torch.full_like(scores, float("-inf"))
        masked[:, self.token_ids] = scores[:, self.token_ids]
        return masked


def reference_style(rec: EmotionRecognizer, items: list[UtteranceInput], gen_tokens: int,
                    constrain_first: bool = False) -> tuple[list[int | None], float]:
    """One utterance per forward, left-padded to the longest prompt, greedy `generate`, parse the text."""
    from transformers import LogitsProcessorList

    encoded = [rec.encode(it) for it in items]
    width = max(len(e.input_ids) for e in encoded)
    tok = rec.backbone.tokenizer
    labels: list[int | None] = []
    start = time.perf_counter()
    with torch.inference_mode():
        for it, e in zip(items, encoded):
            pad = width - len(e.input_ids)
            padded = dataclasses.replace(e, input_ids=[rec.prompt.pad_token_id] * pad + e.input_ids,
                                         pseudo_start=e.pseudo_start + pad, answer_index=width - 1)
            batch = rec.collate([it], [padded])
            batch.attention_mask[0, :pad] = 0
            embeds = rec.input_embeddings(batch)
            processors = LogitsProcessorList([FirstTokenIsALabel(rec.prompt.label_token_ids)] if constrain_first else [])
            out = rec.llm.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask, max_new_tokens=gen_tokens,
                                   do_sample=False, pad_token_id=rec.prompt.pad_token_id, logits_processor=processors)
            text = tok.decode(out[0, -gen_tokens:] if out.shape[1] > gen_tokens else out[0], skip_special_tokens=True)
            labels.append(parse_label(text, list(rec.label_set.words)))
    return labels, time.perf_counter() - start


def versus_reference(args, shipped: EmotionRecognizer, windowed: EmotionRecognizer) -> dict:
    dev = load_dataset("meld:dev")
    pairs = []  # (utterance, its full past) from consecutive dialogues
    for conv in dev:
        past: list[Turn] = []
        for u in conv:
            pairs.append((u, list(past)))
            past.append(Turn(u.speaker, u.text))
        if len(pairs) >= args.n_ref:
            break
    pairs = pairs[: args.n_ref]
    gold = np.array([shipped.label_set.index(u.label) for u, _ in pairs])

    def inputs(rec):
        p = rec.config.prompt
        return [UtteranceInput(u.text, u.speaker, tuple(window_turns(past, len(past), p.context_turns, p.context_min_turns)))
                for u, past in pairs]

    # the paper's readout: the LLM answers with a label word after all layers. A model trained that way
    # (--reference-checkpoint, head lm_head) is the fair reference; without one the shipped adapter is
    # read out through the LM head it was not trained for, and the reference's labels mean little.
    if args.reference_checkpoint:
        lm = EmotionRecognizer.from_pretrained(Path(args.reference_checkpoint).expanduser(), backbone=shipped.backbone)
        if lm.config.head != "lm_head":
            raise SystemExit(f"--reference-checkpoint: {args.reference_checkpoint} has head {lm.config.head!r}, not 'lm_head'")
    else:
        lm = EmotionRecognizer(shipped.backbone, dataclasses.replace(shipped.config, head="lm_head", head_layer=0))
        lm.load_trainable_state_dict({k: v for k, v in shipped.trainable_state_dict().items() if k.startswith("adapter.")})
    ref_items = inputs(lm)
    constrain = bool(args.reference_checkpoint)  # see FirstTokenIsALabel
    reference_style(lm, ref_items[:2], args.gen_tokens, constrain)  # warm-up
    ref_labels, ref_secs = reference_style(lm, ref_items, args.gen_tokens, constrain)
    parsed = np.array([-1 if x is None else x for x in ref_labels])
    lm.predict_proba(ref_items[:4], batch_size=4)
    start = time.perf_counter()
    lm_probs = lm.predict_proba(ref_items, batch_size=16)
    lm_secs = time.perf_counter() - start
    shipped_items = inputs(shipped)
    start = time.perf_counter()
    shipped_probs = shipped.predict_proba(shipped_items, batch_size=16)
    shipped_secs = time.perf_counter() - start
    # the serving path: context_first with prefix caches, conversations batched (walked in order)
    win_items = inputs(windowed)
    conv_of = [u.conversation_id for u, _ in pairs]
    labeler = IncrementalLabeler(windowed)
    order: dict[str, list[int]] = {}
    for i, c in enumerate(conv_of):
        order.setdefault(c, []).append(i)
    inc_probs = np.zeros((len(pairs), len(windowed.label_set)))
    start = time.perf_counter()
    for step in range(max(len(v) for v in order.values())):  # utterance `step` of every dialogue in one call
        idx = [v[step] for v in order.values() if step < len(v)]
        inc_probs[idx] = labeler.predict_proba([(conv_of[i], win_items[i]) for i in idx])
    inc_secs = time.perf_counter() - start
    n = len(pairs)
    acc = lambda pred: float((pred == gold).mean() * 100)
    return {
        "n": n, "gen_tokens": args.gen_tokens,
        "reference": {"utt_s": n / ref_secs, "accuracy": acc(parsed), "parse_failures": int((parsed < 0).sum())},
        "lm_head": {"utt_s": n / lm_secs, "accuracy": acc(lm_probs.argmax(1)),
                    "agreement_with_reference": float((lm_probs.argmax(1) == parsed).mean() * 100)},
        "shipped": {"utt_s": n / shipped_secs, "accuracy": acc(shipped_probs.argmax(1))},
        "incremental": {"utt_s": n / inc_secs, "accuracy": acc(inc_probs.argmax(1))},
    }


# ---------------------------------------------------------------------------- main
def main() -> None:
    import functools
    import builtins

    builtins.print = functools.partial(builtins.print, flush=True)  # partial results survive a timeout
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="gemma3-270m")
    ap.add_argument("--checkpoint", default="default", help="default (the shipped adapter), a directory, or none (untrained)")
    ap.add_argument("--head-layer", type=int, default=12, help="with --checkpoint none")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-turns", type=int, default=None, help="window for a pseudo_first model (default 16; a context_first model keeps its own)")
    ap.add_argument("--min-turns", type=int, default=None, help="default 8")
    ap.add_argument("--line-cap", type=int, default=None, help="default 48")
    ap.add_argument("--points", type=int, nargs="+", default=[1, 10, 50, 200])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--batch-items", type=int, default=32, help="utterances timed per batch size (at least 2 rounds)")
    ap.add_argument("--n-ref", type=int, default=48)
    ap.add_argument("--gen-tokens", type=int, default=4)
    ap.add_argument("--reference-checkpoint", default="",
                    help="an adapter trained with head lm_head (configs/train/ablations/lm-head.yaml) for the reference path")
    ap.add_argument("--skip", nargs="*", default=[], choices=["growth", "batching", "reference"])
    args = ap.parse_args()
    started = time.time()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    base_rss = rss_mib()
    shipped, windowed, everything, what = build_models(args)
    model_rss = rss_mib()
    dtype = windowed.backbone.dtype
    peak = matmul_flops(dtype)
    print(f"model: {args.backbone} {dtype}, {what}; window: context_first, {args.max_turns} to {args.min_turns} turns, "
          f"lines <= {args.line_cap} tokens; cached layers {windowed.cached_layers}")
    print(f"matmul limit ({dtype}): {peak / 1e9:.1f} GFLOP/s")

    if "growth" not in args.skip:
        g = growth(args, windowed, everything)
        print("\n1. ms per utterance as the conversation grows (median of repeats; bs 1)")
        print("| utterance | prompt tokens | incremental ms | full recompute (window) ms | full recompute (whole history) ms | history prompt tokens |")
        print("|---:|---:|---:|---:|---:|---:|")
        for number, r in sorted(g["points"].items()):
            print(f"| {number} | {r['prompt_tokens']} | {r['incremental_ms']:.1f} | {r['full_window_ms']:.1f} | "
                  f"{r['full_history_ms']:.1f} | {r['history_prompt_tokens']} |")
        p = g["points"]
        if 10 in p and max(args.points) in p:
            last = max(args.points)
            print(f"incremental ms at utterance {last} / utterance 10: {p[last]['incremental_ms'] / p[10]['incremental_ms']:.2f}x; "
                  f"whole history without cache: {p[last]['full_history_ms'] / p[10]['full_history_ms']:.2f}x")
        print(f"walk of {max(args.points)} utterances, incremental: mean {g['walk_mean_ms']:.1f} ms/utt (median "
              f"{g['walk_median_ms']:.1f}; includes {g['rebuilds']} rebuilds when the window slid); "
              f"cached prefix at the end: {g['entry_tokens']} tokens, {g['entry_bytes'] / 2**20:.2f} MiB")

    if "batching" not in args.skip:
        b = batching(args, windowed)
        print("\n2. utterances/s with B live conversations labelled per forward (steady state, window sliding as it goes)")
        print("| batch | incremental utt/s | full recompute utt/s | incremental / full | incremental GFLOP/s | % of matmul limit | full GFLOP/s | % of limit | KV cache MiB |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for B, r in b.items():
            print(f"| {B} | {r['incremental_utt_s']:.2f} | {r['full_utt_s']:.2f} | {r['incremental_utt_s'] / r['full_utt_s']:.2f}x | "
                  f"{r['incremental_flop_s'] / 1e9:.1f} | {100 * r['incremental_flop_s'] / peak:.0f}% | {r['full_flop_s'] / 1e9:.1f} | "
                  f"{100 * r['full_flop_s'] / peak:.0f}% | {r['cache_bytes'] / 2**20:.1f} |")
        first, last = min(b), max(b)
        print(f"batch {last} over batch {first} (incremental): {b[last]['incremental_utt_s'] / b[first]['incremental_utt_s']:.2f}x; "
              f"per cached conversation {b[last]['cache_bytes'] / max(1, b[last]['cached_conversations']) / 2**20:.2f} MiB")

    if "reference" not in args.skip:
        r = versus_reference(args, shipped, windowed)
        ref = r["reference"]["utt_s"]
        print(f"\n3. reference style vs the tracker on {r['n']} MELD dev utterances (generation of up to {r['gen_tokens']} tokens; "
              f"reference model: {args.reference_checkpoint + ', first token constrained to the label words' if args.reference_checkpoint else 'the shipped adapter read out through the LM head, untrained for it'})")
        print("| path | utt/s | vs reference | accuracy % | notes |")
        print("|---|---:|---:|---:|---|")
        print(f"| reference: 1 padded utterance per forward, greedy generate, parse | {ref:.2f} | 1.00x | "
              f"{r['reference']['accuracy']:.1f} | {r['reference']['parse_failures']} parse failures |")
        print(f"| tracker, same readout (label words' LM-head rows after all layers), batch 16 | {r['lm_head']['utt_s']:.2f} | "
              f"{r['lm_head']['utt_s'] / ref:.2f}x | {r['lm_head']['accuracy']:.1f} | agrees with the reference on {r['lm_head']['agreement_with_reference']:.1f}% |")
        print(f"| tracker, shipped model as shipped (linear head on its layer), batch 16 | {r['shipped']['utt_s']:.2f} | "
              f"{r['shipped']['utt_s'] / ref:.2f}x | {r['shipped']['accuracy']:.1f} | |")
        print(f"| tracker serving path: context_first + prefix caches, dialogues batched | {r['incremental']['utt_s']:.2f} | "
              f"{r['incremental']['utt_s'] / ref:.2f}x | {r['incremental']['accuracy']:.1f} | "
              f"{'the model as trained' if shipped.config.prompt.layout == 'context_first' else 'weights not trained for this layout'} |")

    print(f"\n4. peak resident memory: {rss_mib():.0f} MiB for the process (before the model {base_rss:.0f} MiB, "
          f"after loading {model_rss:.0f} MiB)")
    print(f"run time {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
