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
    from tracker.model.checkpoint import CheckpointError
    from tracker.model.default import default_checkpoint

    try:
        shipped = EmotionRecognizer.from_pretrained(default_checkpoint(), backbone=backbone)
        print(f"shipped model     {default_checkpoint()}: {shipped.num_trainable_parameters():,} trainable params, "
              f"head {shipped.config.head} on layer {shipped.config.head_layer or 'last'}")
    except CheckpointError as exc:
        print(f"shipped model     none ({exc})")
    return 0


cmd_info.configure = _configure_info
command("info", "show the backbone, the adapter's parameter count and the cache")(cmd_info)


def _configure_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="a training YAML (configs/train/*.yaml)")
    p.add_argument("--run-dir", default=None, help="where the run writes (default: output_dir/name from the config)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if the run directory has a checkpoint")


def cmd_train(args: argparse.Namespace) -> int:
    """Train the adapter (frozen LLM); resumes from the run's last checkpoint unless --no-resume."""
    from tracker.training.config import TrainConfig
    from tracker.training.trainer import Trainer

    config = TrainConfig.from_yaml(args.config)
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

    from tracker.data import labels_read_as
    from tracker.model.default import default_checkpoint
    from tracker.model.recognizer import EmotionRecognizer
    from tracker.training.evaluate import evaluate
    from tracker.training.examples import load_examples

    checkpoint = args.checkpoint or default_checkpoint()
    rec = EmotionRecognizer.from_pretrained(checkpoint)
    out = {"checkpoint": str(checkpoint), "reports": {}}
    for spec in args.data:
        read_as = args.read_as or labels_read_as(spec, rec.label_set.name)
        examples = load_examples(spec, rec.label_set, rec.config.prompt.context_turns, read_as, args.limit,
                                 context_min_turns=rec.config.prompt.context_min_turns)
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


def _configure_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="a Serve YAML (default: configs/serve/local.yaml)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: from the config)")
    p.add_argument("--checkpoint", default=None, help="serve this adapter checkpoint instead of the shipped one")


def _start_service(args: argparse.Namespace):
    from services.runner import LOCAL_CONFIG, service_from_file

    overrides = {}
    if getattr(args, "port", None):
        overrides["port"] = args.port
    service = service_from_file(args.config or LOCAL_CONFIG, **overrides)
    if getattr(args, "checkpoint", None):
        service.args = {**service.args, "model": {**service.args.get("model", {}), "checkpoint": args.checkpoint}}
    return service.start()


def cmd_serve(args: argparse.Namespace) -> int:
    """Start local Ray, Redis (embedded unless REDIS_URL is set) and the tracker application."""
    import time

    print("starting the tracker service (the first start converts the embedded LLM, about a minute) ...", flush=True)
    service = _start_service(args)
    print(f"serving: WebSocket {service.ws_url}")
    print(f"         REST      {service.http_url}/v1/conversations   docs {service.http_url}/docs")
    print(f"         dashboard {service.http_url}/")
    print("Ctrl-C stops it.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()
    return 0


cmd_serve.configure = _configure_serve
command("serve", "run the tracker service on this machine")(cmd_serve)


def _configure_demo(p: argparse.ArgumentParser) -> None:
    _configure_serve(p)
    p.add_argument("--speed", type=float, default=2.0, help="playback speed of the demo call (1 = real time)")
    p.add_argument("--keep-serving", action="store_true", help="keep the service (and dashboard) up after the call")


def cmd_demo(args: argparse.Namespace) -> int:
    """Stream the bundled two-speaker call through the real services and print each label as it arrives."""
    import asyncio
    import sys
    import time
    import uuid

    from clients.stream_client import demo_recording, stream_recording

    recording, meta = demo_recording()
    gold = {(u["speaker"], u["text"]): u["label"] for u in meta["utterances"]}
    print(f"demo call: {meta['source']}, {recording.duration_ms / 1000:.0f} s, speakers {', '.join(recording.speakers)}")
    print("starting the tracker service (Ray Serve + Redis; the first start converts the embedded LLM, about a minute) ...", flush=True)
    t0 = time.time()
    service = _start_service(args)
    print(f"service up in {time.time() - t0:.0f} s at {service.http_url}", flush=True)
    conversation_id = f"demo-{uuid.uuid4().hex[:8]}"

    def show(msg: dict) -> None:
        if msg.get("type") == "utterance":
            conf = msg["probabilities"][msg["label"]]
            ref = gold.get((msg["speaker"], msg["text"]))
            ref_txt = f"  (MELD: {ref})" if ref else ""
            span = f"{msg['start_ms'] / 1000:5.1f}-{msg['end_ms'] / 1000:5.1f}s" if msg.get("start_ms") is not None else "   text   "
            print(f"[{span}] {msg['speaker']:>8s}: {msg['label']:<8s} {conf:4.0%}{ref_txt}  \"{msg['text']}\"", flush=True)
        elif msg.get("type") == "error":
            print(f"error {msg['code']}: {msg['message']}", flush=True)

    try:
        out = asyncio.run(stream_recording(service.ws_url, conversation_id, recording, speed=args.speed, on_message=show))
        print(f"{len(out.results)} utterances labelled; stored in Redis as conversation {conversation_id}")
        print(f"REST:      {service.http_url}/v1/conversations/{conversation_id}")
        print(f"Dashboard: {service.http_url}/")
        if args.keep_serving or sys.stdin.isatty():
            print("The service keeps running; Ctrl-C stops it.", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        service.stop()
    return 0 if out.results else 1


cmd_demo.configure = _configure_demo
command("demo", "stream a bundled call through the real services and print the labels")(cmd_demo)


def _configure_stream(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", help="a WAV/FLAC file, one speaker per channel")
    p.add_argument("--mic", action="store_true", help="stream the microphone instead of a file")
    p.add_argument("--transcript", default=None, help="JSON/JSONL transcripts: speaker, text, start_ms, end_ms")
    p.add_argument("--speakers", default=None, help="comma-separated speaker names, one per channel")
    p.add_argument("--url", default="ws://127.0.0.1:8000/v1/stream", help="the service's WebSocket address")
    p.add_argument("--speed", type=float, default=1.0, help="file playback speed (1 = real time, 0 = as fast as possible)")
    p.add_argument("--conversation-id", default=None)
    p.add_argument("--device", default=None, help="sounddevice input device (index or name)")
    p.add_argument("--channels", type=int, default=1, help="microphone channels")
    p.add_argument("--seconds", type=float, default=None, help="stop the microphone after this long")


def cmd_stream(args: argparse.Namespace) -> int:
    """Stream a file or the microphone to a running tracker; reconnects and resumes on drops."""
    from clients.stream_cli import run_stream

    if bool(args.file) == bool(args.mic):
        raise SystemExit("tracker stream: give a FILE or --mic (not both)")
    speakers = [s.strip() for s in args.speakers.split(",")] if args.speakers else None
    return run_stream(args.url, args.file, args.mic, args.transcript, speakers, args.speed, args.conversation_id,
                      args.device, args.channels, args.seconds)


cmd_stream.configure = _configure_stream
command("stream", "stream a WAV/FLAC file or the microphone to a running service")(cmd_stream)


def _configure_replay(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="meld:dev, emorynlp:dev, ravdess:dev or a .jsonl file (docs/data-format.md)")
    p.add_argument("--through", default=None, help="a running service (http://host:port or ws://.../v1/stream); default: in-process")
    p.add_argument("--checkpoint", default=None, help="adapter checkpoint for in-process replay (default: the shipped model)")
    p.add_argument("--speed", type=float, default=0.0, help="through a service: turns per second x speed (0 = as fast as possible)")
    p.add_argument("--out", default=None, help="predictions JSONL (default: predictions-<data>.jsonl)")
    p.add_argument("--report", default=None, help="write the metrics report as JSON here")
    p.add_argument("--limit", type=int, default=0, help="first N conversations only")
    p.add_argument("--batch-size", type=int, default=8)


def cmd_replay(args: argparse.Namespace) -> int:
    """Run recorded dialogues through the tracker; predictions as JSONL and metrics when labelled."""
    from clients.replay import run_replay

    return run_replay(args.data, args.checkpoint, args.through, args.speed, args.out, args.report, args.limit, args.batch_size)


cmd_replay.configure = _configure_replay
command("replay", "replay recorded dialogues in-process or through a service")(cmd_replay)


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
