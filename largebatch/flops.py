"""Model FLOPs per sample and model FLOPs utilisation (MFU), for the throughput lines of the logs.

Counted as the PaLM paper (Chowdhery et al. 2022, appendix B) counts them: a training step costs 3x the
forward pass (forward + backward for activations + backward for weights), and the forward pass costs 2
FLOPs per multiply-accumulate. For BERT's masked LM at sequence length L with P predicted positions:

    per sample = 6 * L * (encoder parameters)                   every matmul weight (and bias) of the layers
               + 12 * layers * L^2 * hidden                     attention scores QK^T and their use on V
               + 6 * P * (head parameters)                      transform + vocabulary projection, masked only

Embedding lookups are not FLOPs; attention dropout, softmax and layer norms are left out (a few %), as in
PaLM's and nanoGPT's counts. MFU = achieved model FLOP/s per device / the device's dense peak for the
run's precision; the peak table lists bf16/fp16 tensor-core peaks (dense, no sparsity) from the vendors'
datasheets. An unknown device, or an fp32 run (whose peak depends on TF32 settings), logs ``tflops``
without ``mfu``.
"""

from __future__ import annotations

from torch import nn

# Dense bf16/fp16 tensor peaks, TFLOP/s per device, from NVIDIA's datasheets; the first substring of the
# device name that matches wins (so "H100 PCIe" precedes "H100").
PEAK_TFLOPS_16BIT = (
    ("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("V100", 125.0),
)


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The device's dense peak for ``precision`` (bf16 | fp16), or None when unknown."""
    if precision not in ("bf16", "fp16"):
        return None
    for key, peak in PEAK_TFLOPS_16BIT:
        if key in device_name:
            return peak
    return None


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module under torch.compile's and DDP's wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            return model
        model = inner


def bert_flops_per_sample(model: nn.Module, seq_len: int, predictions: int) -> float:
    """Training FLOPs of one BERT masked-LM sample (see the module docstring); ``model`` a BertMaskedLM."""
    mlm = _unwrap(model).mlm
    config = mlm.config
    encoder = sum(p.numel() for p in mlm.bert.encoder.parameters())
    head = sum(p.numel() for p in mlm.cls.parameters())  # the decoder shares the embedding matrix: counted once
    attention = 12 * config.num_hidden_layers * seq_len**2 * config.hidden_size
    return 6.0 * seq_len * encoder + attention + 6.0 * predictions * head


def mfu_metrics(flops_per_sample: float | None, samples_per_s: float, world_size: int, device_name: str,
                precision: str) -> dict[str, float]:
    """{"tflops": achieved model TFLOP/s per device[, "mfu": that / the device's peak]}; {} without a count."""
    if not flops_per_sample:
        return {}
    tflops = flops_per_sample * samples_per_s / world_size / 1e12
    peak = peak_tflops(device_name, precision)
    return {"tflops": tflops} if peak is None else {"tflops": tflops, "mfu": tflops / peak}
