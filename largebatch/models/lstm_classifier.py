"""An LSTM that reads an image row by row and classifies it: LEGW's MNIST-LSTM (arXiv 1901.08256),
the TensorFlow examples' recurrent MNIST model (28 steps of 28 pixels, one LSTM layer of 128, a linear
head on the last step's output, batch 128).

Pixels are scaled to [0, 1]. The loss is SUMMED over the batch's samples (the trainer normalises by the
global number of samples).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LSTMClassifier(nn.Module):
    def __init__(self, row_size: int, num_classes: int, hidden: int = 128, layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.lstm = nn.LSTM(row_size, hidden, num_layers=layers, dropout=dropout if layers > 1 else 0.0,
                            batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """images: uint8 [batch, rows, row_size], read as ``rows`` steps; labels: int64 [batch]."""
        out, _ = self.lstm(images.float() / 255.0)
        logits = self.head(out[:, -1]).float()
        return {"loss_sum": F.cross_entropy(logits, labels, reduction="sum"), "count": labels.numel(),
                "correct": (logits.argmax(-1) == labels).sum()}
