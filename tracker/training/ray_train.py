"""`tracker train --ray`: the library's Trainer run by Ray Train's TorchTrainer.

Each Ray Train worker runs :class:`tracker.training.trainer.Trainer` inside the torch.distributed
process group Ray sets up (gloo on CPU, NCCL on GPU); the trainer shards every epoch's batches
across workers and averages gradients, and rank 0 evaluates and writes the run directory
(``output_dir/name``: ``best/``, ``last/``, ``metrics.json``). On a multi-node cluster
``output_dir`` must be storage every node sees (NFS, a mounted bucket); resuming works as with a
local run. Submit to a cluster with ``ray job submit`` (see docs/training.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tracker.config import load_dataclass, to_dict
from tracker.training.config import TrainConfig


def _worker_loop(loop_config: dict[str, Any]) -> None:
    import ray.train

    from tracker.training.trainer import Trainer

    config = load_dataclass(TrainConfig, loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    trainer = Trainer(config, run_dir=loop_config["run_dir"], progress=rank == 0 and loop_config["progress"])
    result = trainer.fit(resume=loop_config["resume"])
    metrics = {"rank": rank, "steps": result["steps"], "train_seconds": result["train_seconds"]}
    checkpoint = None
    if rank == 0:
        metrics["dev"] = result.get("dev", {})
        metrics["stopped_early"] = result.get("stopped_early", False)
        best = Path(loop_config["run_dir"]) / "best"
        if best.exists():  # Ray keeps a copy in its storage, so the result survives the worker's node
            checkpoint = ray.train.Checkpoint.from_directory(str(best))
    ray.train.report(metrics, checkpoint=checkpoint)  # every worker reports; only rank 0 with a checkpoint


def train_with_ray(config: TrainConfig, run_dir: str | Path | None = None, resume: bool = True,
                   progress: bool = True, address: str | None = None) -> dict[str, Any]:
    """Run the training job on Ray (a local one if none is running); returns rank 0's final metrics."""
    from tracker.ray_env import RAY_ENV

    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=progress)
    run_dir = Path(run_dir) if run_dir else Path(os.path.expandvars(config.output_dir)).expanduser() / config.name
    scaling = config.ray
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": to_dict(config), "run_dir": str(run_dir.resolve()), "resume": resume, "progress": progress},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker}),
        run_config=RunConfig(name=f"tracker-{config.name}",
                             storage_path=str(Path(scaling.storage_path).expanduser().resolve()) if scaling.storage_path else None),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"Ray Train run failed: {result.error}") from result.error
    metrics = dict(result.metrics or {})
    if result.checkpoint is not None:
        metrics["checkpoint"] = result.checkpoint.path
    return metrics
