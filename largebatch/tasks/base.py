"""What the training loop needs to know about a workload, and nothing more.

The loop (``largebatch.train``) knows optimizer steps, accumulation, ranks, schedules, evaluation
points and records. A :class:`Task` knows its data and model, the micro-batches of one optimizer step
for one rank, the loss of a micro-batch as a SUM together with the count that normalises it (the
reference's convention: masked tokens for BERT, streams for the stateful LM, samples for a classifier),
any state it carries between steps, and its metrics. fairseq's ``FairseqTask`` is the model, smaller.

Exact large batches: the loop divides every micro-batch's loss sum by the GLOBAL normalising count of
the step (all micro-batches, all ranks), so any split of a batch gives the same gradient.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from largebatch.errors import ConfigError


@dataclass(frozen=True)
class Metric:
    name: str  # a key of evaluate()'s result, e.g. "eval/loss"
    higher_is_better: bool


class Task:
    """Base class of the workload families in ``largebatch/tasks/``; see the module docstring."""

    primary: Metric = Metric("eval/loss", higher_is_better=False)
    data_names: tuple[str, ...] = ()  # the data configs this task reads (checked before anything runs)

    def __init__(self, cfg):
        self.cfg = cfg
        if self.data_names and cfg.data.name not in self.data_names:
            choices = " | ".join(f"data={n}" for n in self.data_names)
            raise ConfigError(f"model={cfg.model.name} trains on {choices}, not data={cfg.data.name}; "
                              f"add one of them to the command line")

    # ------------------------------------------------------------------ data and plan
    def default_seq_len(self) -> int | None:
        """A stage's sequence length when the stage does not set one (None: not a sequence task)."""
        return None

    def train_samples(self, batch: int, seq_len: int | None, *, allow_declared: bool) -> int:
        """Samples in one epoch at this batch and sequence length (a declared size where allowed)."""
        raise NotImplementedError

    def tokens_per_sample(self, seq_len: int | None) -> int | None:
        """For the tokens/s figure; None where tokens mean nothing."""
        return seq_len

    def flops_per_sample(self, model: nn.Module, seq_len: int | None) -> float | None:
        """Training FLOPs of one sample, for the tflops/mfu figures (largebatch.flops); None: not counted."""
        return None

    def describe(self) -> dict[str, str]:
        """Header lines for lb-plan: what model, what data."""
        return {"model": self.cfg.model.name, "data": self.cfg.data.name}

    # ------------------------------------------------------------------ model and training
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def steps(self, plan, *, stage_index: int, rank: int, world_size: int, start_step: int = 0
              ) -> Iterator[list[dict]]:
        """Yield this rank's micro-batches of one optimizer step after another, from step ``start_step``
        of the stage (a resumed run), forever (the split itself is ``largebatch.data.batching``'s)."""
        raise NotImplementedError

    def normaliser(self, micro_batch: dict) -> torch.Tensor:
        """How many units the reference's loss is averaged over, in this micro-batch."""
        raise NotImplementedError

    def forward(self, model: nn.Module, micro_batch: dict, slot: int) -> dict:
        """{"loss_sum", "count"[, "correct"]}: the loss summed over ``count`` targets. ``slot`` is the
        micro-batch's position within the step, for tasks that keep state per slot."""
        return model(**micro_batch)

    def half_batch(self, micro_batch: dict) -> dict | None:
        """The first half of a micro-batch (the gradient noise scale's small batch, largebatch/noise.py);
        None when it holds a single sample."""
        n = next(iter(micro_batch.values())).shape[0]
        return None if n < 2 else {k: v[: n // 2] for k, v in micro_batch.items()}

    def probe_forward(self, model: nn.Module, micro_batch: dict, slot: int) -> dict:
        """:meth:`forward` for a measurement outside training (the noise probe): it must leave any state
        the task carries between steps untouched."""
        return model(**micro_batch)

    # ------------------------------------------------------------------ evaluation and records
    def evaluate(self, model: nn.Module, accelerator, plan) -> dict:
        raise NotImplementedError

    def final_evaluate(self, model: nn.Module, accelerator, plan, run_dir: Path) -> dict:
        """Held-out numbers computed once, after training (e.g. beam-search BLEU on the test split); the
        task may write files of its own into ``run_dir`` (main process). Nothing by default."""
        return {}

    def state_dict(self) -> dict:
        """State carried between steps (saved with checkpoints)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save_model(self, model: nn.Module, folder: Path) -> None:
        from safetensors.torch import save_model

        folder.mkdir(parents=True, exist_ok=True)
        save_model(model, str(folder / "model.safetensors"))


def perplexity(loss: float) -> float | None:
    """exp of a mean token loss, or None where there is no number to give: a loss past ~709.78 nats (a
    blown-up model) overflows a float, and JSON, the run records' format, has no infinity or NaN."""
    return math.exp(loss) if math.isfinite(loss) and loss < math.log(sys.float_info.max) else None


@torch.no_grad()
def evaluate_samples(model, dataset, eval_batch: int, accelerator, max_batches: int | None) -> dict:
    """Loss and accuracy over the first ``max_batches x eval_batch`` samples of ``dataset`` (all if None),
    sharded over ranks and reduced: the same samples whatever the world size."""
    model.eval()
    limit = len(dataset) if max_batches is None else min(len(dataset), max_batches * eval_batch)
    indices = list(range(accelerator.process_index, limit, accelerator.num_processes))
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    for start in range(0, len(indices), eval_batch):
        batch = torch.utils.data.default_collate([dataset[i] for i in indices[start:start + eval_batch]])
        with accelerator.autocast():
            out = model(**{k: v.to(accelerator.device) for k, v in batch.items()})
        totals += torch.stack([out["loss_sum"].double(), torch.as_tensor(out["count"], dtype=torch.float64,
                               device=accelerator.device), out["correct"].double()])
    loss_sum, n, correct = accelerator.reduce(totals, reduction="sum").tolist()
    model.train()
    return {"eval/loss": loss_sum / max(n, 1), "eval/accuracy": correct / max(n, 1), "eval/count": int(n)}
