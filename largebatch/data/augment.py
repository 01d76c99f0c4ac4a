"""The training views of images: the augmentation of the vision recipes, one sample at a time.

Augmentation is a function of (seed, epoch, index), like the MLM masks: each sample draws from its own
generator, so a resumed run and every rung of a batch ladder see the same crops and flips. The small-image
ops are drawn from that generator and applied with ``torchvision.transforms.v2.functional``; ImageNet's
``v2.RandomResizedCrop`` draws from torch's global CPU generator, so it runs inside
``torch.random.fork_rng`` with that generator seeded per sample (the global state is restored after).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from largebatch.data.batching import sample_seed
from largebatch.data.images import read_image


class SmallImages(Dataset):
    """uint8 images [N, H, W] -> {"images": [1, H, W], "labels"}: pad-and-crop (+ flip) per sample."""

    def __init__(self, images, labels, *, seed: int, padding: int, flip: bool, augment: bool):
        self.images, self.labels = images, labels
        self.seed, self.padding, self.flip, self.augment = seed, padding, flip, augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int) -> dict:
        from torchvision.transforms.v2 import functional as TF

        image = self.images[index].unsqueeze(0)
        if self.augment:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
            top, left = torch.randint(0, 2 * self.padding + 1, (2,), generator=g).tolist()
            flip = bool(torch.rand(1, generator=g) < 0.5)
            h, w = image.shape[-2:]
            # A crop reaching past the border pads with zeros: the padded random crop of the CIFAR recipes.
            image = TF.crop(image, top - self.padding, left - self.padding, h, w)
            if self.flip and flip:
                image = TF.horizontal_flip(image)
        return {"images": image, "labels": self.labels[index]}


class FolderImages(Dataset):
    """Image files -> {"images": uint8 [3, size, size], "labels"}, decoded when read."""

    def __init__(self, files, labels, *, seed: int, size: int, resize: int, train: bool):
        from torchvision.transforms import v2

        self.files, self.labels, self.seed, self.train = files, labels, seed, train
        self.epoch = 0
        self.random_view = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
        self.fixed_view = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size)])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        image = read_image(self.files[index])
        if not self.train:
            return {"images": self.fixed_view(image), "labels": self.labels[index]}
        with torch.random.fork_rng(devices=[]):  # v2 draws from the global CPU generator
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
            return {"images": self.random_view(image), "labels": self.labels[index]}
