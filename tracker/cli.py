"""The `tracker` command line: one sub-command per job."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str):
    """Register `fn(args) -> exit code` as sub-command `name`; `fn.configure(parser)` adds its options."""

    def wrap(fn):
        COMMANDS[name] = (help, getattr(fn, "configure", lambda p: None), fn)
        return fn

    return wrap


def _configure_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=None, help="gemma3-270m (default), tiny, or a local model directory")
    p.add_argument("--config", default=None, help="a model YAML (configs/model/*.yaml)")
    p.add_argument("--dtype", default="auto", help="auto, fp32 or bf16")


def cmd_info(args: argparse.Namespace) -> int:
    """Print the backbone, the adapter's trainable parameter count and where things are cached."""
    import torch

    from tracker import __version__
    from tracker.model.backbone import bf16_supported, cache_dir, load_backbone, resolve_dtype
    from tracker.model.recognizer import EmotionRecognizer, RecognizerConfig

    config = RecognizerConfig.from_yaml(args.config) if args.config else RecognizerConfig()
    if args.backbone:
        config.backbone = args.backbone
    backbone = load_backbone(config.backbone, dtype=args.dtype)
    rec = EmotionRecognizer(backbone, config)
    print(f"tracker {__version__}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    print(f"backbone          {backbone.name}  ({type(backbone.model).__name__})")
    print(f"hidden size       {backbone.hidden_size}   layers {backbone.num_layers}")
    print(f"LLM parameters    {backbone.num_parameters():,} (frozen)")
    print(f"dtype             {resolve_dtype(args.dtype)}  (bf16 supported here: {bf16_supported()})")
    a = config.adapter
    print(f"adapter           d={a.d_model}  pseudo tokens={a.n_pseudo_tokens}  expansion={a.expansion}  "
          f"modalities={[m.name for m in a.modalities]}  text_as_modality={a.text_as_modality}")
    print(f"trainable params  {rec.num_trainable_parameters():,}")
    print(f"label set         {rec.label_set.name}: {', '.join(rec.label_set.labels)}")
    print(f"cache directory   {cache_dir()}")
    return 0


cmd_info.configure = _configure_info
command("info", "show the backbone, the adapter's parameter count and the cache")(cmd_info)


def _configure_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="a training YAML (configs/train/*.yaml)")
    p.add_argument("--run-dir", default=None, help="where the run writes (default: output_dir/name from the config)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if the run directory has a checkpoint")
    p.add_argument("--ray", action="store_true", help="run on Ray Train (TorchTrainer) with the config's scaling")


def cmd_train(args: argparse.Namespace) -> int:
    """Train the adapter (frozen LLM); resumes from the run's last checkpoint unless --no-resume."""
    from tracker.training.config import TrainConfig

    config = TrainConfig.from_yaml(args.config)
    if args.ray:
        from services.train_job import run_ray_training

        result = run_ray_training(config, run_dir=args.run_dir, resume=not args.no_resume)
    else:
        from tracker.training.trainer import Trainer

        result = Trainer(config, run_dir=args.run_dir).fit(resume=not args.no_resume)
    for spec, rep in result.get("dev", {}).items():
        print(f"{spec}: accuracy {100 * rep['accuracy']:.2f}  weighted F1 {100 * rep['weighted_f1']:.2f}")
    return 0


cmd_train.configure = _configure_train
command("train", "train the adapter on a frozen LLM")(cmd_train)


def _configure_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="an adapter checkpoint directory (default: the shipped model)")
    p.add_argument("--data", action="append", required=True, help="meld:dev, emorynlp:dev, ravdess:dev or a .jsonl file; repeatable")
    p.add_argument("--read-as", default="", help="read the data's labels as this label set (ravdess -> meld7)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", default=None, help="write the JSON report here")
    p.add_argument("--limit", type=int, default=0, help="first N conversations only")


def cmd_eval(args: argparse.Namespace) -> int:
    """Accuracy, weighted F1, per-class P/R/F1 and the confusion matrix of a checkpoint on labelled data."""
    import json

    from tracker.model.recognizer import EmotionRecognizer
    from tracker.model.default import default_checkpoint
    from tracker.training.evaluate import evaluate
    from tracker.training.examples import load_examples

    checkpoint = args.checkpoint or default_checkpoint()
    rec = EmotionRecognizer.from_pretrained(checkpoint)
    out = {"checkpoint": str(checkpoint), "reports": {}}
    for spec in args.data:
        read_as = args.read_as
        if not read_as and spec.startswith("ravdess") and rec.label_set.name == "meld7":
            read_as = "meld7"
        examples = load_examples(spec, rec.label_set, rec.config.prompt.context_turns, read_as, args.limit)
        report, _ = evaluate(rec, examples, batch_size=args.batch_size)
        print(f"== {spec} ({checkpoint})")
        print(report.to_text())
        out["reports"][spec] = report.to_dict()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


cmd_eval.configure = _configure_eval
command("eval", "evaluate a checkpoint on labelled data")(cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracker", description="Streaming conversation emotion tracker")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, configure, _) in COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _, _, fn = COMMANDS[args.command]
    try:
        return int(fn(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear one-line error for the user; -v shows the traceback
        if args.verbose:
            raise
        print(f"tracker {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
