"""The `tracker` command line: one sub-command per job."""

from __future__ import annotations

import argparse
import logging
import os
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
    p.add_argument("--ray", action="store_true",
                   help="run through Ray Train (TorchTrainer; workers from the YAML's `ray:` section; "
                        "joins the cluster at RAY_ADDRESS, e.g. under `ray job submit`, else starts a local one)")
    p.add_argument("--run-dir", default=None, help="where the run writes (default: output_dir/name from the config)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if the run directory has a checkpoint")


def cmd_train(args: argparse.Namespace) -> int:
    """Train the adapter (frozen LLM); resumes from the run's last checkpoint unless --no-resume."""
    from tracker.training.config import TrainConfig
    from tracker.training.trainer import Trainer

    config = TrainConfig.from_yaml(args.config)
    if args.ray:
        from tracker.training.ray_train import train_with_ray

        result = train_with_ray(config, run_dir=args.run_dir, resume=not args.no_resume)
    else:
        result = Trainer(config, run_dir=args.run_dir).fit(resume=not args.no_resume)
    for spec, rep in result.get("dev", {}).items():
        print(f"{spec}: accuracy {100 * rep['accuracy']:.2f}  weighted F1 {100 * rep['weighted_f1']:.2f}")
    return 0


cmd_train.configure = _configure_train
command("train", "train the adapter on a frozen LLM")(cmd_train)


def _configure_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="an adapter checkpoint directory (default: the shipped model)")
    p.add_argument("--data", action="append", required=True, help="meld:dev, emorynlp:dev, ravdess:dev or a .jsonl file; add +telephone for the telephone-band copy of the audio (ravdess:dev+telephone); repeatable")
    p.add_argument("--read-as", default="", help="read the data's labels as this label set (ravdess -> meld7)")
    p.add_argument("--batch-size", type=int, default=8, help="utterances per forward pass")
    p.add_argument("--json", default=None, help="write the JSON report here")
    p.add_argument("--limit", type=int, default=0, help="first N conversations only")
    p.add_argument("--plots", default=None, help="save a reliability diagram and a confusion matrix (PNG) per data spec into this directory")


def _spec_slug(spec: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec).strip("_") or "data"


def cmd_eval(args: argparse.Namespace) -> int:
    """Accuracy, weighted and macro F1, per-class P/R/F1, confusion matrix and calibration (ECE, 15 bins)."""
    import json
    from pathlib import Path

    from tracker.metrics import calibration_report, save_confusion_png, save_reliability_png
    from tracker.model.default import default_checkpoint
    from tracker.model.recognizer import EmotionRecognizer
    from tracker.training.evaluate import evaluate, spec_examples

    checkpoint = args.checkpoint or default_checkpoint()
    rec = EmotionRecognizer.from_pretrained(checkpoint)
    out = {"checkpoint": str(checkpoint), "temperature": rec.config.temperature, "reports": {}}
    plots = Path(args.plots) if args.plots else None
    if plots:
        plots.mkdir(parents=True, exist_ok=True)
    for spec in args.data:
        examples = spec_examples(rec, spec, args.read_as, args.limit)
        report, probs = evaluate(rec, examples, batch_size=args.batch_size)
        calib = calibration_report(probs, [ex.label for ex in examples])
        print(f"== {spec} ({checkpoint})")
        print(report.to_text())
        print(f"\ncalibration: ECE {100 * calib.ece:.2f}% over {calib.bins} bins (temperature {rec.config.temperature:.3f})")
        out["reports"][spec] = {**report.to_dict(), "calibration": calib.to_dict()}
        if plots:
            slug = _spec_slug(spec)
            rel = save_reliability_png({spec: calib}, plots / f"reliability-{slug}.png",
                                       title=f"{spec}: T={rec.config.temperature:.2f}")
            save_confusion_png(report, plots / f"confusion-{slug}.png", title=spec)
            print(f"plots: {rel} and {plots / f'confusion-{slug}.png'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


cmd_eval.configure = _configure_eval
command("eval", "evaluate a checkpoint on labelled data")(cmd_eval)


def _configure_calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="the adapter checkpoint directory to calibrate (rewritten in place)")
    p.add_argument("--data", action="append", required=True, help="dev data to fit on (meld:dev, ravdess:dev, ...); repeatable, pooled")
    p.add_argument("--batch-size", type=int, default=8, help="utterances per forward pass")
    p.add_argument("--limit", type=int, default=0, help="first N conversations of each spec only")
    p.add_argument("--dry-run", action="store_true", help="report the fit without writing the checkpoint")
    p.add_argument("--plot", default=None, help="save a reliability diagram before and after (PNG) here")
    p.add_argument("--json", default=None, help="write the fit and ECE before/after here")


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Fit the checkpoint's temperature on dev data (NLL) and store it in its config; ECE before and after."""
    import json

    import numpy as np

    from tracker.metrics import calibration_report, save_reliability_png
    from tracker.model.recognizer import EmotionRecognizer
    from tracker.training.calibrate import fit_temperature, rescale
    from tracker.training.evaluate import predict_examples, spec_examples

    rec = EmotionRecognizer.from_pretrained(args.checkpoint)
    parts = {}
    for spec in args.data:
        examples = spec_examples(rec, spec, limit=args.limit)
        parts[spec] = (predict_examples(rec, examples, args.batch_size), np.array([ex.label for ex in examples]))
    probs = np.concatenate([p for p, _ in parts.values()])
    gold = np.concatenate([g for _, g in parts.values()])
    fit = fit_temperature(probs, gold, current=rec.config.temperature)
    out = {"checkpoint": str(args.checkpoint), "temperature_before": rec.config.temperature,
           "temperature": fit.temperature, "nll_before": fit.nll_before, "nll_after": fit.nll_after, "data": {}}
    print(f"temperature {rec.config.temperature:.4f} -> {fit.temperature:.4f}   NLL {fit.nll_before:.4f} -> {fit.nll_after:.4f}")
    for spec, (p, g) in parts.items():
        before, after = calibration_report(p, g), calibration_report(rescale(p, fit.factor), g)
        out["data"][spec] = {"ece_before": before.ece, "ece_after": after.ece}
        print(f"{spec}: ECE {100 * before.ece:.2f}% -> {100 * after.ece:.2f}% ({len(g)} utterances, 15 bins)")
    if args.plot:
        save_reliability_png({"before": fit.before, "after": fit.after}, args.plot,
                             title=f"{' + '.join(parts)}: T {rec.config.temperature:.2f} -> {fit.temperature:.2f}")
        print(f"plot: {args.plot}")
    if not args.dry_run:
        rec.config.temperature = fit.temperature
        rec.save_pretrained(args.checkpoint)
        print(f"wrote temperature {fit.temperature:.4f} into {args.checkpoint}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


cmd_calibrate.configure = _configure_calibrate
command("calibrate", "fit a checkpoint's temperature on dev data")(cmd_calibrate)


def _configure_train_refiner(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="the base adapter checkpoint (default: the shipped model)")
    p.add_argument("--window", type=int, action="append", required=True, help="w; repeat with --stride for several refiners")
    p.add_argument("--stride", type=int, action="append", required=True, help="s (w must be a multiple of s)")
    p.add_argument("--train", default="meld:train", help="dialogues the refiners are trained on (a dataset spec)")
    p.add_argument("--dev", default="meld:dev", help="dialogues they are selected on (a dataset spec)")
    p.add_argument("--train-dialogues", type=int, default=300, help="random train dialogues to use (0 = all)")
    p.add_argument("--dev-dialogues", type=int, default=0, help="dev dialogues (0 = all)")
    p.add_argument("--head-layer", type=int, default=12, help="the LLM layer whose states the window head reads")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per refiner")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (AdamW)")
    p.add_argument("--aux", type=float, default=0.0, help="weight of a loss on each window judgement alone")
    p.add_argument("--out", required=True, help="refiners are written to OUT/w<w>s<s>")
    p.add_argument("--cache", default=None, help="feature cache directory (default: <cache dir>/refiner-features)")
    p.add_argument("--json", default=None, help="write the results here")


def cmd_train_refiner(args: argparse.Namespace) -> int:
    """Train refiners (window head + RFAttention) on a frozen base adapter; dev W-F1 with and without refinement."""
    import json
    import logging
    from pathlib import Path

    from tracker.model.backbone import cache_dir
    from tracker.model.default import default_checkpoint
    from tracker.model.recognizer import EmotionRecognizer
    from tracker.model.refine import Refiner, RefinerConfig
    from tracker.training import refine as R

    logging.getLogger().setLevel(logging.INFO)
    if len(args.window) != len(args.stride):
        raise SystemExit("give one --stride per --window")
    checkpoint = Path(args.checkpoint or default_checkpoint())
    rec = EmotionRecognizer.from_pretrained(checkpoint)
    cache = Path(args.cache) if args.cache else cache_dir() / "refiner-features"
    tag, ctag = R._checkpoint_tag(checkpoint), R._cache_tag(checkpoint)
    data = {}
    for name, spec, limit in (("train", args.train, args.train_dialogues), ("dev", args.dev, args.dev_dialogues)):
        convs = R.sample_conversations(spec, limit)
        key = R._key(spec, limit, 0)
        data[name] = (convs, R.base_probabilities(rec, convs, cache / f"base-{ctag}-{key}.npz"), key)
    results = {"checkpoint": str(checkpoint), "train": args.train, "train_dialogues": len(data["train"][0]),
               "train_utterances": int(len(data["train"][1]["labels"])), "dev": args.dev,
               "dev_utterances": int(len(data["dev"][1]["labels"])), "refiners": []}
    for w, s in zip(args.window, args.stride):
        config = RefinerConfig(backbone=rec.backbone.name, label_set=rec.label_set.name, window=w, stride=s,
                               head_layer=args.head_layer)
        refiner = Refiner(rec.backbone, config, rec.label_set)
        slots = {}
        for name, (convs, base, key) in data.items():
            slots[name] = R.slot_states(refiner, convs, base["base"], cache / f"slots-{ctag}-{key}-w{w}s{s}-L{args.head_layer}.npz")
        fit = R.fit(refiner, (slots["train"], data["train"][1]), (slots["dev"], data["dev"][1]), steps=args.steps,
                    lr=args.lr, aux=args.aux)
        out = Path(args.out) / f"w{w}s{s}"
        n_dev = len(data["dev"][1]["labels"])
        row = {"window": w, "stride": s, "t": w // s, "dev_weighted_f1": fit.dev_wf1, "dev_accuracy": fit.dev_acc,
               "base_dev_weighted_f1": fit.base_wf1, "base_dev_accuracy": fit.base_acc,
               "judgements_only_dev_weighted_f1": fit.judge_only_wf1, "best_step": fit.best_step,
               "dev_windows": int(slots["dev"]["windows"]), "dev_window_seconds": float(slots["dev"]["seconds"]),
               "windows_per_utterance": int(slots["dev"]["windows"]) / n_dev, "path": str(out)}
        refiner.save_pretrained(out, extra={"base_checkpoint_sha1": tag, "training": row})
        results["refiners"].append(row)
        print(f"w={w} s={s} t={w // s}: dev W-F1 {100 * fit.base_wf1:.2f} -> {100 * fit.dev_wf1:.2f} "
              f"(acc {100 * fit.base_acc:.2f} -> {100 * fit.dev_acc:.2f}; judgements alone {100 * fit.judge_only_wf1:.2f}; "
              f"step {fit.best_step}); {row['windows_per_utterance']:.3f} window forwards per utterance", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


cmd_train_refiner.configure = _configure_train_refiner
command("train-refiner", "train conversation-level refiners (Lantern) on a frozen base adapter")(cmd_train_refiner)


def _configure_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="a Serve YAML (default: configs/serve/local.yaml)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: from the config)")
    p.add_argument("--checkpoint", default=None, help="serve this adapter checkpoint instead of the shipped one")
    p.add_argument("--refiner", default=None,
                   help="conversation-level refinement: 'default' (the shipped refiner) or a refiner directory; "
                        "labels then come as interim, then final")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="port where Prometheus scrapes the service's metrics (Ray's metrics export port, "
                        "http://HOST:PORT/metrics; default: a free port, printed at start; docs/operations.md)")
    p.add_argument("--transport", choices=["serve", "haproxy"], default="serve",
                   help="how WebSocket and HTTP traffic reaches the app: 'serve' (Ray Serve's proxy, every listener on "
                        "loopback) or 'haproxy' (HAProxy straight to the ingress replica: about a third less CPU per "
                        "utterance; also opens HAProxy's metrics and stats ports on all interfaces; docs/deploy.md)")
    p.add_argument("--ephemeral", action="store_true",
                   help="the embedded Redis keeps nothing: history and API keys are gone when the service stops "
                        "(default: kept in the cache directory with Redis's append-only file)")


def _start_service(args: argparse.Namespace):
    """Start the local service; reuse the last local key if this Redis still knows it; record where it runs."""
    from clients.local import key_path, read_state, redis_data_dir, write_state
    from services.runner import LOCAL_CONFIG, service_from_file

    overrides = {}
    if getattr(args, "port", None):
        overrides["port"] = args.port
    service = service_from_file(args.config or LOCAL_CONFIG, **overrides)
    if getattr(args, "checkpoint", None):
        service.args = {**service.args, "model": {**service.args.get("model", {}), "checkpoint": args.checkpoint}}
    if getattr(args, "refiner", None):
        service.args = {**service.args, "refine": {**service.args.get("refine", {}), "checkpoint": args.refiner}}
    if getattr(args, "no_transcript", False):  # the call's text must come from speech recognition
        service.args = {**service.args, "asr": "on"}
    service.api_key = read_state().get("api_key")
    if getattr(args, "metrics_port", None):
        service.metrics_port = args.metrics_port
    service.transport = getattr(args, "transport", None) or "serve"
    if not getattr(args, "ephemeral", False):
        service.redis_dir, service.key_file = redis_data_dir(), key_path()
    service.start()
    write_state(http_url=service.http_url, ws_url=service.ws_url, redis_url=service.redis_url, api_key=service.api_key,
                pid=os.getpid(), metrics_url=service.metrics_url)
    return service


def _run_service(args: argparse.Namespace, then=None) -> int:
    """Start the local service, run `then(service)` (default: serve until stopped), stop everything.

    SIGTERM and SIGINT (also when the process started with SIGINT ignored) stop the app, Serve, Ray
    and the embedded Redis and remove the state file; the exit code is then 0.
    """
    from services.lifecycle import StopRequested, stop_signals, wait_forever

    service, code = None, 0
    with stop_signals() as guard:
        try:
            service = _start_service(args)
            code = (then or (lambda s: wait_forever()))(service) or 0
        except StopRequested as stop:
            print(f"{stop}: stopping the service ...", file=sys.stderr, flush=True)
        finally:
            guard.stopping()
            if service is not None:
                service.stop()
            _forget_service()
    return code


def _print_key(service) -> None:
    if service.api_key:
        print(f"API key   {service.api_key}   (tenant {service.key_tenant}; send as 'Authorization: Bearer <key>')")
        print(f"dashboard {service.http_url}/#key={service.api_key}")
    else:
        print("authentication is OFF (auth.enabled: false): do not expose this service")


def cmd_serve(args: argparse.Namespace) -> int:
    """Start local Ray, Redis (embedded unless REDIS_URL is set) and the tracker application."""
    from services.lifecycle import wait_forever

    print("starting the tracker service (the first start converts the embedded LLM, about a minute) ...", flush=True)

    def serve_forever(service) -> int:
        print(f"serving: WebSocket {service.ws_url}")
        print(f"         REST      {service.http_url}/v1/conversations   docs {service.http_url}/docs")
        print(f"         dashboard {service.http_url}/")
        if service.metrics_url:
            print(f"         metrics   {service.metrics_url}   (Prometheus)")
        _print_key(service)
        print(_storage_note(service))
        print(f"Ctrl-C or SIGTERM (kill {os.getpid()}) stops it.", flush=True)
        wait_forever()
        return 0

    return _run_service(args, serve_forever)


def _storage_note(service) -> str:
    if not service.redis_dir:
        return ("history  " + ("in the Redis at $REDIS_URL" if service.redis_url and service._redis is None
                               else "kept only while the service runs (--ephemeral)"))
    return f"history  kept in {service.redis_dir} (Redis append-only file; --ephemeral keeps nothing)"


def _forget_service() -> None:
    """The service is gone: remove the state file that told clients where it was."""
    from clients.local import remove_state

    remove_state()


cmd_serve.configure = _configure_serve
command("serve", "run the tracker service on this machine")(cmd_serve)


def _configure_demo(p: argparse.ArgumentParser) -> None:
    _configure_serve(p)
    p.add_argument("--speed", type=float, default=2.0, help="playback speed of the demo call (1 = real time)")
    p.add_argument("--keep-serving", action="store_true",
                   help="keep the service (and dashboard) up after the call until Ctrl-C or SIGTERM "
                        "(the default when run from a terminal)")
    p.add_argument("--no-transcript", action="store_true",
                   help="stream the call's audio without its transcript: the service recognizes the speech "
                        "(embedded Whisper, asr: on) and each label is printed with the recognized text")


def cmd_demo(args: argparse.Namespace) -> int:
    """Stream the bundled two-speaker call through the real services and print each label as it arrives."""
    import asyncio
    import sys
    import time
    import uuid

    from clients.stream_client import demo_recording, stream_recording

    recording, meta = demo_recording()
    if args.no_transcript:
        recording.transcripts = []

    def gold_of(msg: dict) -> dict | None:
        """The bundled utterance a result is about: same speaker, overlapping span (or the same text)."""
        for u in meta["utterances"]:
            if u["speaker"] != msg["speaker"]:
                continue
            if msg.get("start_ms") is not None and min(u["end_ms"], msg["end_ms"]) > max(u["start_ms"], msg["start_ms"]):
                return u
            if msg.get("start_ms") is None and u["text"] == msg["text"]:
                return u
        return None
    print(f"demo call: {meta['source']}, {recording.duration_ms / 1000:.0f} s, speakers {', '.join(recording.speakers)}"
          + ("; streamed without its transcript (the service recognizes the speech)" if args.no_transcript else ""))
    print("starting the tracker service (Ray Serve + Redis; the first start converts the embedded LLM, about a minute) ...", flush=True)
    t0 = time.time()
    conversation_id = f"demo-{uuid.uuid4().hex[:8]}"

    def show(msg: dict) -> None:
        if msg.get("type") == "utterance":
            conf = msg["probabilities"][msg["label"]]
            ref = gold_of(msg)
            ref_txt = f"  (MELD: {ref['label']})" if ref else ""
            span = f"{msg['start_ms'] / 1000:5.1f}-{msg['end_ms'] / 1000:5.1f}s" if msg.get("start_ms") is not None else "   text   "
            kind = "" if not getattr(args, "refiner", None) else ("final   " if msg.get("is_final") else "interim ")
            if msg.get("revised"):
                ref_txt += f"  (revised, was {msg.get('interim_label')})"
            heard = ""
            if msg.get("text_source") == "asr":
                heard = f"  [heard, confidence {msg.get('asr_confidence', 0):.2f}]"
                if ref:
                    heard += f"  (said: \"{ref['text']}\")"
            print(f"[{span}] {kind}{msg['speaker']:>8s}: {msg['label']:<8s} {conf:4.0%}{ref_txt}  \"{msg['text']}\"{heard}", flush=True)
        elif msg.get("type") == "error":
            print(f"error {msg['code']}: {msg['message']}", flush=True)

    def stream_demo(service) -> int:
        from services.lifecycle import wait_forever

        print(f"service up in {time.time() - t0:.0f} s at {service.http_url}", flush=True)
        _print_key(service)
        out = asyncio.run(stream_recording(service.ws_url, conversation_id, recording, speed=args.speed, on_message=show,
                                           headers=service.auth_headers))
        print(f"{len(out.results)} utterances labelled; stored in Redis as conversation {conversation_id}")
        if args.keep_serving or sys.stdin.isatty():
            print(f"REST:      {service.http_url}/v1/conversations/{conversation_id}   (with the API key)")
            print(f"Dashboard: {service.http_url}/#conversation={conversation_id}&key={service.api_key or ''}")
            print(f"The service keeps running; Ctrl-C (or kill {os.getpid()}) stops it.", flush=True)
            wait_forever()
        elif service.redis_dir:
            print("The service stops now. The call is kept: `tracker serve` serves it again (REST "
                  f"/v1/conversations/{conversation_id} and the dashboard); `tracker demo --keep-serving` keeps the "
                  "service up after the call.", flush=True)
        else:
            print("The service stops now (--ephemeral: the call is not kept); `tracker demo --keep-serving` keeps it "
                  "up after the call.", flush=True)
        return 0 if out.results else 1

    return _run_service(args, stream_demo)


cmd_demo.configure = _configure_demo
command("demo", "stream a bundled call through the real services and print the labels")(cmd_demo)


def _configure_stream(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", help="a WAV/FLAC file, one speaker per channel")
    p.add_argument("--mic", action="store_true", help="stream the microphone instead of a file")
    p.add_argument("--transcript", default=None, help="JSON/JSONL transcripts: speaker, text, start_ms, end_ms")
    p.add_argument("--speakers", default=None, help="comma-separated speaker names, one per channel")
    p.add_argument("--url", default=None,
                   help="the service's WebSocket address (default: the running local service's, else "
                        "ws://127.0.0.1:8000/v1/stream)")
    p.add_argument("--speed", type=float, default=1.0, help="file playback speed (1 = real time, 0 = as fast as possible)")
    p.add_argument("--conversation-id", default=None,
                   help="the id the call is stored under (default: a new random one); the same id resumes it")
    p.add_argument("--device", default=None, help="sounddevice input device (index or name)")
    p.add_argument("--channels", type=int, default=1, help="microphone channels")
    p.add_argument("--seconds", type=float, default=None, help="stop the microphone after this long")
    p.add_argument("--key", default=None, help="API key (default: $TRACKER_API_KEY, else the local service's key)")


def cmd_stream(args: argparse.Namespace) -> int:
    """Stream a file or the microphone to a running tracker; reconnects and resumes on drops."""
    from clients.stream_cli import run_stream

    if bool(args.file) == bool(args.mic):
        raise SystemExit("tracker stream: give a FILE or --mic (not both)")
    speakers = [s.strip() for s in args.speakers.split(",")] if args.speakers else None
    return run_stream(args.url, args.file, args.mic, args.transcript, speakers, args.speed, args.conversation_id,
                      args.device, args.channels, args.seconds, api_key=args.key)


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
    p.add_argument("--batch-size", type=int, default=8, help="in-process: utterances per forward pass")
    p.add_argument("--key", default=None, help="API key with --through (default: $TRACKER_API_KEY, else the local service's key)")
    p.add_argument("--live", action="store_true",
                   help="in-process through the live path (session + pipeline + a private Redis) instead of offline batches")


def cmd_replay(args: argparse.Namespace) -> int:
    """Run recorded dialogues through the tracker; predictions as JSONL and metrics when labelled."""
    from clients.replay import run_replay

    return run_replay(args.data, args.checkpoint, args.through, args.speed, args.out, args.report, args.limit, args.batch_size,
                      api_key=args.key, live=args.live)


cmd_replay.configure = _configure_replay
command("replay", "replay recorded dialogues in-process or through a service")(cmd_replay)


def _configure_keys(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["create", "list", "revoke"],
                   help="create a key for a tenant, list the keys, or revoke one by its id")
    p.add_argument("key_id", nargs="?", help="revoke: the key id (the 8 hex characters after 'trk_')")
    p.add_argument("--tenant", default=None, help="create: the tenant the key belongs to")
    p.add_argument("--name", default="", help="create: a note on what the key is for")
    p.add_argument("--redis-url", default=None, help="default: $REDIS_URL, else the running local service's Redis")
    p.add_argument("--prefix", default="tracker", help="the store's key_prefix")
    p.add_argument("--no-store", action="store_true",
                   help="create: print a key and the auth.keys entry for a serve config, without touching Redis")


def cmd_keys(args: argparse.Namespace) -> int:
    """API keys: create one for a tenant (shown once, stored hashed), list them, revoke one."""
    import os
    import time

    from clients.local import read_state
    from services.auth import KeyStore, check_tenant, generate_key, hash_key

    if args.action == "create" and args.no_store:
        tenant = check_tenant(args.tenant or "default")
        key = generate_key()
        print(key)
        print(f"# serve config, applications[0].args.auth.keys:\n- {{sha256: {hash_key(key)}, tenant: {tenant}, name: {args.name!r}}}")
        return 0
    url = args.redis_url or os.environ.get("REDIS_URL") or read_state().get("redis_url")
    if not url:
        raise SystemExit("tracker keys: no Redis to use: pass --redis-url, set REDIS_URL, or start `tracker serve`")
    store = KeyStore(url, args.prefix)
    if args.action == "create":
        if not args.tenant:
            raise SystemExit("tracker keys create: --tenant is required")
        key, rec = store.create(args.tenant, args.name)
        print(key)
        print(f"# key id {rec['key_id']}, tenant {rec['tenant']}: shown once, only its SHA-256 is stored", file=sys.stderr)
        return 0
    if args.action == "list":
        rows = store.list()
        print(f"{'key id':8s}  {'tenant':20s}  {'created (UTC)':19s}  {'status':8s}  name")
        for r in rows:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(r["created_at"])))
            status = "revoked" if r.get("revoked_at") else "active"
            print(f"{r['key_id']:8s}  {r['tenant']:20s}  {created:19s}  {status:8s}  {r.get('name', '')}")
        return 0
    if not args.key_id:
        raise SystemExit("tracker keys revoke: give the key id (see `tracker keys list`)")
    if not store.revoke(args.key_id):
        print(f"tracker keys revoke: no key with id {args.key_id!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}")
    return 0


cmd_keys.configure = _configure_keys
command("keys", "create, list or revoke API keys (each belongs to a tenant)")(cmd_keys)


def _configure_data(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_action", required=True, metavar="{check,prepare}")
    check = sub.add_parser("check", help="list which datasets the data folder holds and what is missing",
                           description="list which datasets the data folder holds and what is missing")
    check.add_argument("--root", default=None, help="the data folder (default: $TRACKER_DATA_DIR, else ../shared/data)")
    prep = sub.add_parser("prepare", help="build a dataset's folder from its official download",
                          description="build a dataset's folder from its official download")
    prep.add_argument("dataset", choices=["ravdess", "meld"],
                      help="ravdess: the Audio_Speech_Actors_01-24.zip release (zip or folder) -> ravdess_16k/; "
                           "meld: a declare-lab/MELD checkout -> meld/ and emorynlp/")
    prep.add_argument("src", help="the download: RAVDESS zip or folder, or the MELD repository checkout")
    prep.add_argument("--root", default=None, help="the data folder to write into (default: $TRACKER_DATA_DIR, else ../shared/data)")
    prep.add_argument("--actors", default="", help="ravdess: keep only these actors, e.g. 1-20 (default: all in the release)")
    prep.add_argument("--overwrite", action="store_true", help="replace what is already there")


def _actor_range(text: str) -> set[int] | None:
    if not text:
        return None
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def cmd_data(args: argparse.Namespace) -> int:
    """`data check`: what the data folder holds; `data prepare`: build a dataset's folder from its download."""
    from pathlib import Path

    from tracker.data.paths import data_dir
    from tracker.data.sources import check_data, format_check

    root = Path(args.root).expanduser() if args.root else data_dir()
    if args.data_action == "check":
        statuses = check_data(root)
        print(format_check(statuses, root))
        return 0 if all(s.ok for s in statuses) else 1
    from tracker.data.prepare import prepare_meld, prepare_ravdess

    if args.dataset == "meld":
        for path in prepare_meld(args.src, root, overwrite=args.overwrite):
            print(f"wrote {path}")
        return 0
    bar = _progress_bar(desc="ravdess", unit="clip")
    labels = prepare_ravdess(args.src, root / "ravdess_16k", actors=_actor_range(args.actors), overwrite=args.overwrite,
                             progress=lambda n, name: bar.update(1))
    bar.close()
    print(f"wrote {labels.parent} ({sum(1 for _ in labels.open()) - 1} clips, labels.csv)")
    return 0


def _progress_bar(**kwargs):
    """A tqdm bar on a terminal; nothing (no carriage returns in log files) otherwise."""
    from tracker.progress import progress_bar

    return progress_bar(**kwargs)


cmd_data.configure = _configure_data
command("data", "check the data folder, or prepare a dataset from its official download")(cmd_data)


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
