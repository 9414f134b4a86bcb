"""Measure training throughput: the model alone, the full data pipeline, and a plain baseline.

All runs happen in one process, one after another, with the project's composed training config,
so their ratios hold on a machine whose load changes between runs:

- limit: training steps on one batch of random tensors, kept in memory, with the project's model,
  batch size, image size, precision and memory format;
- project: `--epochs` epochs on `--images` training and `--val-images` validation images of the
  real data, with an empty decoded-image cache, so epoch 1 fills it and later epochs read it;
- baseline: the same images and model in fp32, contiguous memory format, without the cache and
  without JPEG draft decoding, so every epoch decodes each full file with Pillow;
- the model-only step rate of the baseline settings.

The first `--warmup` batches of each epoch are not timed. With `--repeats N` the whole sequence
runs N times and each row reports its fastest repeat, the one that other processes slowed least.
The 5-epoch estimate scales the measured per-image times to the full train and validation
splits: epoch 1 at the project's cold-cache rates and epochs 2-5 at its warm-cache rates,
against 5 baseline epochs at the mean baseline rates.

    python scripts/bench_train.py --data-root /path/to/facemask-data
    python scripts/bench_train.py --data-root DATA --images 256 -- data.image_size=112
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from facemask.settings import configure_environment  # noqa: E402

configure_environment()

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from facemask.data.datamodule import FaceMaskDataModule, ImageFolderDataset  # noqa: E402

BASELINE_OVERRIDES = (
    "trainer.precision=32-true",
    "model.channels_last=false",
    "data.image_cache=false",
    "data.jpeg_draft=false",
)

MAIN_JOB_EPOCHS = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True, help="class-folder dataset")
    parser.add_argument("--images", type=int, default=384, help="training images per epoch")
    parser.add_argument("--val-images", type=int, default=96, help="validation images per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each pipeline run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches per epoch")
    parser.add_argument(
        "--repeats", type=int, default=1, help="repeat all runs; the fastest of each is reported"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="scan and image cache folder (default: a new temporary folder, removed at the end)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="train.py overrides for every run, e.g. data.image_size=112"
    )
    return parser.parse_args(argv)


@dataclass
class EpochTiming:
    """Timed images and seconds of one epoch's training and validation batches."""

    train_images: int = 0
    train_seconds: float = 0.0
    val_images: int = 0
    val_seconds: float = 0.0

    @property
    def train_rate(self) -> float:
        return self.train_images / self.train_seconds if self.train_seconds else float("nan")

    @property
    def val_rate(self) -> float:
        return self.val_images / self.val_seconds if self.val_seconds else float("nan")


class ThroughputTimer(Callback):
    """Time each batch from the end of the previous one, which includes waiting for its data."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.epochs: list[EpochTiming] = []
        self._last = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.append(EpochTiming())
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if batch_idx >= self.warmup:
            self.epochs[-1].train_images += len(batch[1])
            self.epochs[-1].train_seconds += now - self._last
        self._last = now

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = time.perf_counter()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        now = time.perf_counter()
        # One untimed batch: validation workers start and fill their queue in the first epoch.
        if batch_idx >= 1 and self.epochs:
            self.epochs[-1].val_images += len(batch[1])
            self.epochs[-1].val_seconds += now - self._last
        self._last = now


def compose_config(args: argparse.Namespace, work_dir: Path, *extra: str) -> DictConfig:
    overrides = [
        f"data.root={args.data_root.resolve()}",
        f"data.cache_dir={work_dir / 'cache'}",
        f"paths.output_dir={work_dir / 'run'}",
        "model.pretrained=false",
        *args.overrides,
        *extra,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def build_trainer(cfg: DictConfig, timer: ThroughputTimer, epochs: int, **options) -> L.Trainer:
    return instantiate(
        cfg.trainer,
        max_epochs=epochs,
        min_epochs=1,
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **options,
    )


def subset(dataset: ImageFolderDataset, count: int, seed: int) -> ImageFolderDataset:
    """Return `count` images of `dataset`, drawn at random with `seed`."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    chosen = order[: min(count, len(dataset))].tolist()
    return ImageFolderDataset(
        [dataset.paths[i] for i in chosen],
        [dataset.labels[i] for i in chosen],
        [dataset.sha256s[i] for i in chosen],
        dataset.transform,
        dataset.image_loader,
    )


def measure_model_only(cfg: DictConfig, args: argparse.Namespace) -> float:
    """Return the training rate, in images per second, on one in-memory batch of random tensors."""
    L.seed_everything(cfg.seed, workers=True)
    size, batch_size = cfg.data.image_size, cfg.data.batch_size
    batch = (torch.randn(batch_size, 3, size, size), torch.randint(0, 2, (batch_size,)))
    steps = max(1, args.images // batch_size)
    loader = DataLoader([batch] * steps, batch_size=None)
    model = instantiate(cfg.model, class_names=["mask", "no_mask"])
    timer = ThroughputTimer(args.warmup)
    build_trainer(cfg, timer, 1, limit_val_batches=0).fit(model, train_dataloaders=loader)
    return timer.epochs[0].train_rate


def measure_pipeline(
    cfg: DictConfig, args: argparse.Namespace
) -> tuple[list[EpochTiming], dict[str, int]]:
    """Train `args.epochs` epochs on subsets of the real data; return timings and split sizes."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule: FaceMaskDataModule = instantiate(cfg.data)
    datamodule.setup("fit")
    full_sizes = {split: len(datamodule.datasets[split]) for split in ("train", "val")}
    datamodule.datasets["train"] = subset(datamodule.datasets["train"], args.images, cfg.seed)
    datamodule.datasets["val"] = subset(datamodule.datasets["val"], args.val_images, cfg.seed)
    model = instantiate(cfg.model, class_names=datamodule.classes)
    timer = ThroughputTimer(args.warmup)
    build_trainer(cfg, timer, args.epochs).fit(model, datamodule=datamodule)
    return timer.epochs, full_sizes


@dataclass
class BenchResults:
    """Rates of the four runs, the full split sizes, and the load average before each run."""

    limit: float
    project: list[EpochTiming]
    base_limit: float
    baseline: list[EpochTiming]
    split_sizes: dict[str, int]
    loads: list[float]


def epoch_seconds(timing: EpochTiming, sizes: dict[str, int]) -> float:
    """Estimate one full epoch's seconds from the measured rates."""
    return sizes["train"] / timing.train_rate + sizes["val"] / timing.val_rate


def describe_settings(cfg: DictConfig) -> str:
    memory_format = "channels_last" if cfg.model.channels_last else "contiguous"
    cache = "image cache" if cfg.data.image_cache else "no cache"
    draft = "JPEG draft" if cfg.data.jpeg_draft else "full decode"
    return f"{cfg.trainer.precision}, {memory_format}, {cache}, {draft}"


def rate_table(results: BenchResults) -> list[str]:
    rows = ["| run | train img/s | val img/s |", "|---|---|---|"]
    rows.append(f"| limit: project settings, model only | {results.limit:.1f} | |")
    for number, timing in enumerate(results.project, start=1):
        state = "cold cache" if number == 1 else "warm cache"
        rates = f"{timing.train_rate:.1f} | {timing.val_rate:.1f}"
        rows.append(f"| project, epoch {number} ({state}) | {rates} |")
    rows.append(f"| baseline settings, model only | {results.base_limit:.1f} | |")
    for number, timing in enumerate(results.baseline, start=1):
        rows.append(
            f"| baseline, epoch {number} | {timing.train_rate:.1f} | {timing.val_rate:.1f} |"
        )
    return rows


def main_job_estimate(results: BenchResults) -> str:
    """Estimate the training and validation minutes of the 5-epoch job for both settings."""
    sizes = results.split_sizes
    cold, warm = results.project[0], results.project[-1]
    project_s = epoch_seconds(cold, sizes) + (MAIN_JOB_EPOCHS - 1) * epoch_seconds(warm, sizes)
    rerun_s = MAIN_JOB_EPOCHS * epoch_seconds(warm, sizes)
    base_epochs = [epoch_seconds(timing, sizes) for timing in results.baseline]
    baseline_s = MAIN_JOB_EPOCHS * sum(base_epochs) / len(base_epochs)
    return (
        f"{MAIN_JOB_EPOCHS}-epoch estimate, {sizes['train']} train and {sizes['val']} val images, "
        f"training and validation only: project {project_s / 60:.1f} min with epoch 1 filling "
        f"the cache, {rerun_s / 60:.1f} min with a cache from an earlier run; baseline "
        f"{baseline_s / 60:.1f} min. Speed-up {baseline_s / project_s:.2f}x "
        f"({baseline_s / rerun_s:.2f}x with a filled cache)."
    )


def print_report(
    cfg: DictConfig, base_cfg: DictConfig, args: argparse.Namespace, results: BenchResults
) -> None:
    cold, warm = results.project[0], results.project[-1]
    threads = torch.get_num_threads()
    print(f"\nhost: {os.cpu_count()} CPUs, torch {torch.__version__} with {threads} threads")
    print(f"model {cfg.model.name}, {cfg.data.image_size} px, batch {cfg.data.batch_size}")
    print(f"project:  {describe_settings(cfg)}")
    print(f"baseline: {describe_settings(base_cfg)}")
    print(
        f"timed: {args.images} train and {args.val_images} val images per epoch, "
        f"the first {args.warmup} train batches and 1 val batch of each epoch untimed; "
        f"fastest of {args.repeats} repeat(s)\n"
    )
    print("\n".join(rate_table(results)))
    print(
        f"\nproject pipeline / limit: {warm.train_rate / results.limit:.0%} with a warm cache, "
        f"{cold.train_rate / results.limit:.0%} while filling it"
    )
    print(main_job_estimate(results))
    loads = ", ".join(f"{load:.2f}" for load in results.loads)
    print(f"load average (1 min) before each run and at the end of each repeat: {loads}")


def run_once(
    args: argparse.Namespace, cfg: DictConfig, base_cfg: DictConfig, image_cache: Path | None
) -> BenchResults:
    """Run the four measurements; `image_cache` is emptied first so that epoch 1 fills it."""
    loads = [os.getloadavg()[0]]
    limit = measure_model_only(cfg, args)
    loads.append(os.getloadavg()[0])
    if image_cache is not None:
        shutil.rmtree(image_cache, ignore_errors=True)
    project, sizes = measure_pipeline(cfg, args)
    loads.append(os.getloadavg()[0])
    base_limit = measure_model_only(base_cfg, args)
    loads.append(os.getloadavg()[0])
    baseline, _ = measure_pipeline(base_cfg, args)
    loads.append(os.getloadavg()[0])
    return BenchResults(limit, project, base_limit, baseline, sizes, loads)


def fastest_epochs(runs: list[list[EpochTiming]]) -> list[EpochTiming]:
    """Return, per epoch number, the timing with the highest training rate across repeats."""
    by_epoch = zip(*runs, strict=True)
    return [max(timings, key=lambda timing: timing.train_rate) for timings in by_epoch]


def best_of(repeats: list[BenchResults]) -> BenchResults:
    """Combine repeats by keeping each run's fastest measurement, the one least slowed by load."""
    return BenchResults(
        limit=max(result.limit for result in repeats),
        project=fastest_epochs([result.project for result in repeats]),
        base_limit=max(result.base_limit for result in repeats),
        baseline=fastest_epochs([result.baseline for result in repeats]),
        split_sizes=repeats[0].split_sizes,
        loads=[load for result in repeats for load in result.loads],
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Lightning's per-fit banners (devices, tips) would bury the report.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    work_dir = Path(tempfile.mkdtemp(prefix="bench_train-"))
    if args.cache_dir is not None:
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / "cache").symlink_to(args.cache_dir.resolve(), target_is_directory=True)
    try:
        cfg = compose_config(args, work_dir)
        base_cfg = compose_config(args, work_dir, *BASELINE_OVERRIDES)
        # A cache folder given by the user is never emptied, so its epoch 1 may be warm.
        image_cache = None if args.cache_dir else work_dir / "cache" / "images"
        repeats = [run_once(args, cfg, base_cfg, image_cache) for _ in range(args.repeats)]
        print_report(cfg, base_cfg, args, best_of(repeats))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
