"""ResNets for image classification (He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016, arXiv 1512.03385).

- ``depth`` 18 / 34 / 50: torchvision's ImageNet ResNets, built with ``weights=None`` (ResNet-50 with 1000
  classes has torchvision's 25,557,032 parameters). 50 is the network of Goyal et al., MLPerf and the
  LAMB paper.
- ``depth`` 20: the CIFAR ResNet of the same paper (Sec. 4.2: a 3x3 conv of 16, then 3 stages of 3 basic
  blocks with 16 / 32 / 64 channels, global average pooling, a linear head; ~0.27M parameters). Its
  shortcut where the shape changes is the paper's option A: subsample by 2 and pad the new channels with
  zeros (no parameters). For CPUs: it is a small fraction of ResNet-18's FLOPs.

Options:

- ``small_stem``: the torchvision nets' 7x7 stride-2 conv + max-pool becomes a 3x3 stride-1 conv with no
  pooling, so 28x28 / 32x32 inputs keep their resolution into the first stage (ResNet-20 always has it).
- ``zero_init_residual``: the last BatchNorm of every residual block starts with gamma = 0 (Goyal et al.
  2017, Sec. 5.1), so every block starts as its shortcut. Without normalisation (``norm="none"``) the
  block's last conv starts at zero instead, with the same effect.
- ``norm``: ``"batch"`` (BatchNorm, statistics of each forward pass) or ``"none"`` (no normalisation: every
  sample's loss depends on that sample alone, so gradient accumulation is exactly one large batch).
- ``bn_virtual_batch``: BatchNorm over virtual batches of that many samples (:class:`GhostBatchNorm2d`):
  with it dividing the micro-batch, gradient accumulation is exactly one large batch with BatchNorm too.
- ``in_channels``: 1 for grey-level images (MNIST, Fashion-MNIST): the first conv takes one channel
  rather than the image being repeated three times.

:class:`ImageClassifier` wraps a net: it takes uint8 images, scales them to [0, 1] and normalises them with
the dataset's channel mean and std (on the device, so batches travel as uint8), and returns the
cross-entropy SUMMED over the samples (label smoothing while training only), the sample count and the
top-1 / top-5 hits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEPTHS = (18, 20, 34, 50)
NORMS = ("batch", "none")


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over virtual ("ghost") batches (Hoffer, Hubara, Soudry 2017, "Train longer, generalize
    better"; MLPerf's ResNet-50 LARS reference normalises over 64 images): while training, each group of
    ``virtual_batch`` consecutive samples is normalised by its own mean and variance. A sample's output then
    depends on its group alone, so when ``virtual_batch`` divides the micro-batch, any split of a global batch
    over micro-batches and ranks gives the same gradient. Running statistics are updated once per forward, as
    torch's BatchNorm does, with the mean of the groups' means and of their (unbiased) variances. In eval
    mode it is BatchNorm on the running statistics."""

    def __init__(self, num_features: int, virtual_batch: int, **kwargs):
        super().__init__(num_features, **kwargs)
        if virtual_batch < 1:
            raise ValueError(f"virtual_batch must be >= 1, got {virtual_batch}")
        self.virtual_batch = virtual_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        n, v = x.shape[0], self.virtual_batch
        if n % v:
            raise ValueError(f"a batch of {n} samples does not split into virtual batches of {v}: make "
                             "model.bn_virtual_batch divide the micro-batch")
        groups = x.reshape(n // v, v, *x.shape[1:])  # [G, v, C, H, W]
        dims = (1, *range(3, groups.dim()))
        mean = groups.mean(dim=dims, keepdim=True)
        var = groups.var(dim=dims, unbiased=False, keepdim=True)
        shape = (1, -1, *([1] * (x.dim() - 2)))
        y = ((groups - mean) * torch.rsqrt(var + self.eps)).reshape_as(x)
        y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats:
            with torch.no_grad():
                count = groups[0].numel() // x.shape[1]  # values per channel in one group
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.mean(0).flatten(), momentum)
                self.running_var.lerp_(var.mean(0).flatten() * count / max(count - 1, 1), momentum)
        return y


def _norm_layer(norm: str, virtual_batch: int | None = None):
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm == "none":
        return lambda channels: nn.Identity()
    if virtual_batch:
        return lambda channels: GhostBatchNorm2d(channels, virtual_batch)
    return nn.BatchNorm2d


def _kaiming(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # torchvision's ResNet init
    return conv


class CifarBlock(nn.Module):
    """Two 3x3 convs; the shortcut subsamples and zero-pads channels where the shape changes (option A)."""

    def __init__(self, in_channels: int, channels: int, stride: int, norm_layer):
        super().__init__()
        self.conv1 = _kaiming(nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False))
        self.bn1 = norm_layer(channels)
        self.conv2 = _kaiming(nn.Conv2d(channels, channels, 3, 1, 1, bias=False))
        self.bn2 = norm_layer(channels)
        self.relu = nn.ReLU(inplace=True)
        self.stride, self.extra = stride, channels - in_channels

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images; n = 3 is ResNet-20."""

    def __init__(self, blocks_per_stage: int = 3, num_classes: int = 10, in_channels: int = 3,
                 norm: str = "batch", bn_virtual_batch: int | None = None):
        super().__init__()
        norm_layer = _norm_layer(norm, bn_virtual_batch)
        self.conv1 = _kaiming(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False))
        self.bn1 = norm_layer(16)
        self.relu = nn.ReLU(inplace=True)
        stages, channels = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(CifarBlock(channels, width, stride if i == 0 else 1, norm_layer))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def residual_blocks(net: nn.Module) -> list[nn.Module]:
    """The residual blocks of a net built here, in order."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return [m for m in net.modules() if isinstance(m, (CifarBlock, BasicBlock, Bottleneck))]


def _zero_init_residual(net: nn.Module) -> None:
    """Each block's last BN gamma (or, without BN, its last conv) := 0: the block starts as its shortcut."""
    for block in residual_blocks(net):
        last = "3" if hasattr(block, "bn3") else "2"
        norm = getattr(block, f"bn{last}")
        target = norm if isinstance(norm, nn.BatchNorm2d) else getattr(block, f"conv{last}")
        nn.init.zeros_(target.weight)


def build_resnet(depth: int, num_classes: int, *, in_channels: int = 3, small_stem: bool = False,
                 zero_init_residual: bool = True, norm: str = "batch", bn_virtual_batch: int | None = None
                 ) -> nn.Module:
    """The net of ``depth`` (see the module docstring); raises ValueError for what cannot be built."""
    if depth not in DEPTHS:
        raise ValueError(f"depth must be one of {DEPTHS} (20: the CIFAR ResNet), got {depth}")
    if depth == 20:
        if not small_stem:
            raise ValueError("ResNet-20 is the CIFAR network: it always has the 3x3 stride-1 stem "
                             "(small_stem must be true)")
        net = CifarResNet(3, num_classes, in_channels, norm, bn_virtual_batch)
    else:
        import torchvision

        net = getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=num_classes,
                                                             norm_layer=_norm_layer(norm, bn_virtual_batch))
        if small_stem:
            net.conv1 = _kaiming(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False))
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = _kaiming(nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False))
    if zero_init_residual:
        _zero_init_residual(net)
    return net


class ImageClassifier(nn.Module):
    """uint8 images [batch, C, H, W] (or [batch, H, W] for one channel) + int64 labels -> the loss SUMMED
    over samples, the count, and the top-1 / top-5 hits."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], *,
                 label_smoothing: float = 0.0, channels_last: bool = False):
        super().__init__()
        self.net = net
        for name, values in (("mean", mean), ("std", std)):  # not saved: they come from the data config
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1),
                                 persistent=False)
        self.label_smoothing = label_smoothing
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.dim() == 3:
            x = x.unsqueeze(1)
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.net(x).float()
        smoothing = self.label_smoothing if self.training else 0.0  # eval/loss is the plain cross-entropy
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        return {"loss_sum": F.cross_entropy(logits, labels, reduction="sum", label_smoothing=smoothing),
                "count": labels.numel(), "correct": (logits.argmax(-1) == labels).sum(),
                "correct5": (top == labels[:, None]).any(-1).sum()}
