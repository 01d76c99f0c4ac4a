"""Per-device memory of a training run, estimated before it is launched (``lb-plan --gpu-memory``).

    device bytes = parameters + gradients + optimizer state   (fp32: 4 bytes a value)
                 + activations of one micro-batch             (what the forward keeps for the backward)

Under ``sharding=fsdp2`` parameters, gradients and optimizer state are divided by the world size, plus
the working copies of the FSDP units being computed (the largest unit, twice: one computing, one
prefetched; parameters and gradients); with accumulation, micro-batches before the last keep their
gradients unsharded (``no_sync``, as under DDP), so gradients are then full-size on every rank.
Mixed precision (bf16/fp16 autocast) keeps fp32 weights and optimizer state, and halves the
activations, not the rest.

Activations are estimated for transformer encoders (BERT) only, by Korthikanti et al. 2022 ("Reducing
Activation Recomputation in Large Transformer Models", arXiv 2205.05198, sec. 4.1): per layer
``s*b*h*(34 + 5*a*s/h)`` bytes with 16-bit activations, generalised here to the feed-forward width and
to 4-byte activations. It counts the attention probabilities; flash / memory-efficient attention does
not keep them, so the estimate is an upper bound there. The framework's workspace, the CUDA context
(~0.5-1 GiB) and allocator fragmentation come on top: leave ~10-20% of the device free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

GIB = 1024**3
FP32 = 4


@dataclass(frozen=True)
class TransformerShape:
    layers: int
    hidden: int
    heads: int
    intermediate: int  # feed-forward width
    vocab: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device; ``activations`` is None where the model has no estimate."""

    parameters: int
    gradients: int
    optimizer_state: int
    gathered: int  # FSDP2: the working copies of the units being computed (0 without sharding)
    activations: int | None

    @property
    def total(self) -> int:
        """Everything estimated (without activations when they are unknown: a lower bound then)."""
        return self.parameters + self.gradients + self.optimizer_state + self.gathered + (self.activations or 0)

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def state_tensors_per_parameter(optimizer: str, **options) -> int:
    """How many parameter-sized state tensors ``optimizer`` keeps (LAMB, Adam: 2; LARS, momentum SGD,
    Adagrad: 1; SGD without momentum: 0), found by stepping it once on a 4-element parameter, so the
    count follows the registry and the options (``momentum=0``) without a table of its own."""
    from largebatch.optim import create_optimizer

    layer = torch.nn.Linear(2, 2, bias=False)  # a named parameter of 4 elements: exclusion patterns need names
    param = layer.weight
    param.grad = torch.ones_like(param)
    opt = create_optimizer(layer, optimizer, lr=0.0, **options)
    opt.step()
    return sum(1 for value in opt.state[param].values() if torch.is_tensor(value) and value.numel() == 4)


def transformer_activation_bytes(shape: TransformerShape, seq_len: int, micro_batch: int, bytes_per_value: int,
                                 masked_fraction: float | None = None) -> int:
    """Activations a transformer encoder keeps for the backward pass at one micro-batch.

    Per layer (Korthikanti et al. sec. 4.1, v bytes a value, 1 byte a dropout mask, i the feed-forward
    width): attention (5v+1)sbh + (2v+1)as^2b, feed-forward (v+1)sbh + 2v*sbi, two layer norms 2v*sbh;
    v=2, i=4h gives their sbh(34 + 5as/h). Plus the embedding output (LayerNorm input and dropout mask)
    and an MLM head at ``masked_fraction`` of the positions (None: at every position): its transform
    (4 values of h) and the fp32 logits with their log-softmax (2 x 4 bytes x vocab) per position."""
    s, b, h, a, i, v = seq_len, micro_batch, shape.hidden, shape.heads, shape.intermediate, bytes_per_value
    per_layer = (8 * v + 2) * s * b * h + 2 * v * s * b * i + (2 * v + 1) * a * s * s * b
    embeddings = (v + 1) * s * b * h
    positions = s * b * (1.0 if masked_fraction is None else masked_fraction)
    head = positions * (4 * v * h + 2 * FP32 * shape.vocab)
    return int(shape.layers * per_layer + embeddings + head)


def estimate(*, parameters: int, largest_unit: int, state_tensors: int, world_size: int, sharded: bool,
             accumulation: int, activations: int | None) -> MemoryEstimate:
    """Per-device bytes of a run with ``parameters`` fp32 parameters (see the module docstring).
    ``largest_unit``: parameters of the largest FSDP unit (used with ``sharded`` only)."""
    shards = world_size if sharded else 1
    full = FP32 * parameters
    gradients = full if (not sharded or accumulation > 1) else full // shards
    return MemoryEstimate(
        parameters=full // shards,
        gradients=gradients,
        optimizer_state=state_tensors * full // shards,
        gathered=2 * 2 * FP32 * largest_unit if sharded else 0,
        activations=activations,
    )


def transformer_shape(model: torch.nn.Module) -> TransformerShape | None:
    """The encoder shape of a model that carries a Hugging Face transformer config (BERT), else None."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if all(hasattr(config, key) for key in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                 "intermediate_size", "vocab_size")):
            return TransformerShape(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                                    config.intermediate_size, config.vocab_size)
    return None
