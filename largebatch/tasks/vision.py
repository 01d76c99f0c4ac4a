"""Image classification with ResNets: Goyal et al.'s ImageNet ResNet-50 and, for CPUs, ResNet-20.

Each sample is one image; the loss is summed over samples and normalised by the GLOBAL number of samples
of the step. Sample order is ``largebatch.data.batching``'s seeded permutation per epoch, the same for every
batch size. Metrics: held-out loss (plain cross-entropy), top-1 accuracy (primary) and top-5 accuracy.

Data (the configs the MNIST-LSTM reads too; the task decides the view):
``data=fashion_mnist`` and ``data=mnist`` are 28x28 grey-level images, seen as one-channel pictures.
Training view: a random crop of the image padded with ``model.crop_padding`` zeros on every side, plus a
horizontal flip with probability 1/2 for Fashion-MNIST (not for digits, where a flip changes the class).
``data=imagefolder`` is ImageNet's train/val layout. Training view: ``RandomResizedCrop(model.image_size)``
and a horizontal flip; held-out view (and training with ``model.augment=false``): resize the shorter side
to ``model.eval_resize``, centre crop ``model.image_size``. The small images are seen whole when held out.

Augmentation (``largebatch.data.augment``) is a function of (seed, epoch, index), like the MLM masks: a
resumed run and every rung of a batch ladder see the same crops and flips.

BatchNorm normalises with the statistics of each forward pass: one micro-batch on one device (the
per-device BN of the papers; Goyal et al. use 32 per GPU). Accumulating k micro-batches is therefore NOT
the same as one batch of k micro-batches for a BN model; with ``model.norm=none`` it is (see
experiments/vision/README.md). The per-device BN batch is logged when training starts.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader, Subset

from largebatch.data.augment import FolderImages, SmallImages
from largebatch.data.batching import STAGE_EPOCH_STRIDE, index_steps
from largebatch.data.images import IMAGE_FOLDER_SOURCE, load_image_data, load_image_folder
from largebatch.errors import ConfigError
from largebatch.tasks.base import Metric, Task

log = logging.getLogger(__name__)

# Channel mean and std of the training images (0-1 scale), used to normalise the inputs.
CHANNEL_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's, as torchvision's recipes
}
FLIPPED = ("fashion_mnist", "imagefolder")  # digits are not flipped


class VisionTask(Task):
    primary = Metric("eval/accuracy", higher_is_better=True)
    data_names = ("fashion_mnist", "mnist", "imagefolder")

    def __init__(self, cfg):
        super().__init__(cfg)
        from largebatch.models.resnet import DEPTHS, NORMS

        m = cfg.model
        if m.depth not in DEPTHS:
            raise ConfigError(f"model.depth={m.depth}: choose 18, 34 or 50 (torchvision) or 20 (the CIFAR "
                              "ResNet)")
        if m.norm not in NORMS:
            raise ConfigError(f"model.norm={m.norm!r}: choose batch or none")
        if m.depth == 20 and m.small_stem is False:
            raise ConfigError("model.depth=20 is the CIFAR ResNet, which always has the small stem: drop "
                              "model.small_stem=false (or set it to true / null)")
        if not 0 <= m.label_smoothing < 1:
            raise ConfigError(f"model.label_smoothing={m.label_smoothing} must be in [0, 1)")
        if m.crop_padding < 0 or not 0 < m.image_size <= m.eval_resize:
            raise ConfigError(f"model.crop_padding={m.crop_padding} must be >= 0 and model.image_size="
                              f"{m.image_size} in 1..model.eval_resize={m.eval_resize}")
        self.folder = cfg.data.source == IMAGE_FOLDER_SOURCE
        self._splits = None
        self._logged_bn_batch = False

    @property
    def splits(self):
        if self._splits is None:
            data = self.cfg.data
            if self.folder:
                if data.valid_size:
                    raise ConfigError("data.valid_size carves validation images from in-memory sources only; an "
                                      "image folder's val/ is its held-out split: set data.valid_size=0")
                self._splits = load_image_folder(data.folder, data.max_train)
            else:
                self._splits = load_image_data(data.source, data.folder, data.max_train, data.valid_size)
            wanted = self.cfg.model.num_classes
            if wanted is not None and wanted < self._splits.num_classes:
                raise ConfigError(f"model.num_classes={wanted} but {self._splits.source} has "
                                  f"{self._splits.num_classes} classes; set model.num_classes=null (from "
                                  "the data)")
        return self._splits

    def small_stem(self) -> bool:
        """model.small_stem, or where null: the 3x3 stem for images of 64 pixels or less."""
        m = self.cfg.model
        if m.small_stem is not None:
            return bool(m.small_stem)
        return m.depth == 20 or not self.folder or m.image_size <= 64

    def train_samples(self, batch: int, seq_len: int | None, *, allow_declared: bool) -> int:
        if allow_declared and self.cfg.data.train_samples is not None:
            return self.cfg.data.train_samples
        return len(self.splits.train_labels)

    def tokens_per_sample(self, seq_len: int | None) -> None:
        return None

    def describe(self) -> dict[str, str]:
        m, data = self.cfg.model, self.cfg.data
        view = (f"{m.image_size}px crops" if self.folder else "28x28, 1 channel") + (
            "" if m.augment else ", no augmentation")
        return {"model": f"resnet{m.depth} ({'3x3' if self.small_stem() else '7x7 + max-pool'} stem, norm "
                         f"{m.norm}, zero-init residual {'on' if m.zero_init_residual else 'off'})",
                "data": f"{data.name} (source {data.source}, {view})"}

    def half_batch(self, micro_batch: dict) -> dict | None:
        """The noise probe's half micro-batch; none where it would not split into ghost BatchNorm groups."""
        half = super().half_batch(micro_batch)
        v = self.cfg.model.bn_virtual_batch
        if half is None or not v or next(iter(half.values())).shape[0] % v == 0:
            return half
        return None

    def build_model(self):
        from largebatch.models.resnet import ImageClassifier, build_resnet

        m = self.cfg.model
        num_classes = m.num_classes if m.num_classes is not None else self.splits.num_classes
        mean, std = CHANNEL_STATS[self.cfg.data.name]
        net = build_resnet(m.depth, num_classes, in_channels=len(mean), small_stem=self.small_stem(),
                           zero_init_residual=m.zero_init_residual, norm=m.norm,
                           bn_virtual_batch=m.bn_virtual_batch)
        on_cuda = self.cfg.device != "cpu" and torch.cuda.is_available()
        return ImageClassifier(net, mean, std, label_smoothing=m.label_smoothing,
                               channels_last=bool(m.channels_last and on_cuda))

    def _dataset(self, split: str) -> torch.utils.data.Dataset:
        """``split``: "train", "valid" (carved by data.valid_size) or "test" (the held-out split)."""
        m, s, seed = self.cfg.model, self.splits, self.cfg.seed
        train = split == "train"
        if self.folder:
            files, labels = (s.train_files, s.train_labels) if train else (s.eval_files, s.eval_labels)
            return FolderImages(files, labels, seed=seed, size=m.image_size, resize=m.eval_resize,
                                train=train and m.augment)
        images, labels = {"train": (s.train_images, s.train_labels), "valid": (s.valid_images, s.valid_labels),
                          "test": (s.eval_images, s.eval_labels)}[split]
        return SmallImages(images, labels, seed=seed, padding=m.crop_padding,
                           flip=self.cfg.data.name in FLIPPED, augment=train and m.augment)

    def steps(self, plan, *, stage_index, rank, world_size, start_step=0):
        if self.cfg.model.norm == "batch" and not self._logged_bn_batch:
            log.info("BatchNorm batch: %d images per device per forward pass (statistics are per "
                     "micro-batch; %d micro-batch(es) x %d device(s) make the batch of %d)",
                     plan.micro_batch, plan.accumulation, world_size, plan.batch)
            self._logged_bn_batch = True
        return index_steps(self._dataset("train"), plan, rank=rank, world_size=world_size,
                           seed=self.cfg.seed, num_workers=self.cfg.data.num_workers,
                           first_epoch=STAGE_EPOCH_STRIDE * stage_index, start_step=start_step)

    def normaliser(self, micro_batch):
        return micro_batch["labels"].numel()

    def evaluate(self, model, accelerator, plan) -> dict:
        """Loss, top-1 and top-5 over the first ``eval_max_batches x eval_batch`` held-out images (all if
        null), sharded over ranks and reduced: the same images whatever the world size. eval/: the
        validation split where ``data.valid_size`` carves one, and then test/: the test set at the same points;
        without one, eval/ is the held-out split."""
        has_valid = not self.folder and self.splits.valid_images is not None
        sets = {"eval": "valid", "test": "test"} if has_valid else {"eval": "test"}
        return {f"{prefix}/{k}": v for prefix, split in sets.items() for k, v in self._score(model, accelerator,
                                                                                              split).items()}

    @torch.no_grad()
    def _score(self, model, accelerator, split: str) -> dict:
        dataset, eval_batch = self._dataset(split), self.cfg.eval_batch
        max_batches = self.cfg.eval_max_batches
        limit = len(dataset) if max_batches is None else min(len(dataset), max_batches * eval_batch)
        shard = Subset(dataset, range(accelerator.process_index, limit, accelerator.num_processes))
        loader = DataLoader(shard, batch_size=eval_batch, num_workers=self.cfg.data.num_workers)
        model.eval()
        totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
        for batch in loader:
            with accelerator.autocast():
                out = model(**{k: v.to(accelerator.device) for k, v in batch.items()})
            totals += torch.stack([out["loss_sum"].double(), torch.as_tensor(
                out["count"], dtype=torch.float64, device=accelerator.device), out["correct"].double(),
                out["correct5"].double()])
        model.train()
        loss_sum, n, correct, correct5 = accelerator.reduce(totals, reduction="sum").tolist()
        n_ = max(n, 1)
        return {"loss": loss_sum / n_, "accuracy": correct / n_, "top5": correct5 / n_, "samples": int(n)}
