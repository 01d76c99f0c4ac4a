"""How the trainer spreads one run over processes: Accelerate's DDP, or sharded data parallel (FSDP2).

``sharding=none`` (the default): Accelerate prepares the model (DDP over several processes) and the
optimizer, and checkpoints them. ``sharding=fsdp2``: the trainer applies torch's ``fully_shard`` itself,
on every backend: each process holds a 1/world shard of every parameter, gradient and optimizer state
(ZeRO-3), and the same code runs on CPU processes (gloo, what the tests run) and on GPUs (NCCL). It does
not go through Accelerate's FSDP plugin, which Accelerate 1.15 enables on GPU backends only, so that the
tested path is the path that trains; Accelerate still starts the processes, places tensors, reduces
counts, runs autocast and saves every rank's RNG states.

Exactness under FSDP2, and where it comes from:

- Parameters are DTensors. LAMB/LARS take their foreach path for them (``largebatch.optim._common.
  choose_path``), whose per-tensor norms are DTensor reductions over the shards, so every trust ratio is
  the whole tensor's; the trainer's global gradient norm (clip checks, logs) reduces the same way.
- The loss convention is DDP's: FSDP2's reduce-scatter averages gradients over ranks, as DDP's
  all-reduce does, so the trainer's ``world / global count`` factor holds for both.
- Accumulation: micro-batches before the last skip the reduce-scatter (``no_sync``, as under DDP);
  the last one reduces the accumulated sum once.

Evaluation runs on gathered parameters (every module unsharded, none resharded until it ends), so a
forward pass needs no collective and ranks may evaluate different numbers of batches; each rank holds
the whole model while it evaluates. Checkpoints store the model and optimizer shards with
``torch.distributed.checkpoint`` (``fsdp2/`` in the checkpoint folder) next to Accelerate's state.

Not supported, refused before anything runs: Accelerate's DeepSpeed (ZeRO flattens and partitions
parameters, so a per-tensor trust ratio would see a slice of a flat buffer) and Accelerate's FSDP plugin
(use ``sharding=fsdp2`` with a multi-GPU launch config instead); ``precision=fp16`` with FSDP2 (its
gradient scaler is not wired to sharded gradients: use bf16).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from largebatch.errors import ConfigError

SHARDED_STATE = "fsdp2"  # the folder of a checkpoint that holds the model and optimizer shards


def adopt_cluster_environment() -> None:
    """Inside a submitit job (``hydra/launcher=submitit_slurm`` or ``submitit_local``, one task per
    device) every task is one rank: export RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT from the
    job's environment (on a cluster, SLURM's variables) so that torch.distributed and Accelerate start
    from ``env://`` as under torchrun. A launcher that set WORLD_SIZE itself is left alone."""
    if "SUBMITIT_EXECUTOR" not in os.environ or "WORLD_SIZE" in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    # Every task sees all of the node's GPUs; Accelerate picks cuda:LOCAL_RANK.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def check_launch(cfg) -> None:
    """Refuse what would make the layer-wise optimizers silently wrong or the run unprepared, before
    any process group or model exists."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ConfigError(
            "DeepSpeed is not supported: ZeRO flattens and partitions the parameters, so LAMB/LARS would compute "
            "trust ratios of slices of a flat buffer instead of whole tensors. Use sharding=fsdp2 (sharded data "
            "parallel with exact per-tensor norms) or sharding=none (DDP) with a plain multi-GPU launch, e.g. "
            "`accelerate launch --config_file conf/accelerate/multi_gpu.yaml -m largebatch.cli sharding=fsdp2 ...`")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ConfigError(
            "the launch config enables Accelerate's FSDP plugin, which lb-train does not use: it shards with "
            "torch's fully_shard itself (the same code on CPU and GPU). Launch with a multi-GPU config "
            "(conf/accelerate/multi_gpu.yaml or multi_node.yaml) and add sharding=fsdp2")
    if cfg.sharding == "fsdp2" and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ConfigError("sharding=fsdp2 shards over processes and this run has one; launch N processes "
                          "(torchrun --nproc_per_node N, or accelerate launch --config_file "
                          "conf/accelerate/multi_gpu.yaml) or use sharding=none on one device")
    if cfg.sharding == "fsdp2" and cfg.precision == "fp16":
        raise ConfigError("sharding=fsdp2 with precision=fp16: fp16 loss scaling is not wired to sharded gradients; "
                          "use precision=bf16 (no loss scaling needed) or sharding=none")


def data_parallel(cfg, accelerator) -> DataParallel:
    """The strategy ``cfg.sharding`` names, for this accelerator's processes."""
    if cfg.sharding == "fsdp2":
        return FullyShardedDataParallel(accelerator)
    return DataParallel(accelerator)


class DataParallel:
    """One process, or DDP: Accelerate wraps the model and optimizer and its ``save_state`` holds them."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def shard(self, model: nn.Module) -> nn.Module:
        """The model as the optimizer must see it (built before ``prepare``)."""
        return model

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        return self.accelerator.prepare(model, optimizer)

    def no_sync(self, model: nn.Module):
        """Context for a micro-batch before the last: no gradient communication."""
        return self.accelerator.no_sync(model)

    def evaluation(self, model: nn.Module):
        """Context around the task's evaluation."""
        return contextlib.nullcontext()

    def save(self, folder: Path) -> None:
        """Write what Accelerate's ``save_state`` does not hold (every rank calls it)."""

    def load(self, folder: Path) -> None:
        """Read what :meth:`save` wrote (every rank calls it)."""

    def exportable(self, model: nn.Module, task) -> nn.Module | None:
        """The plain model to export, on the main process (None elsewhere); every rank calls it."""
        return self.accelerator.unwrap_model(model) if self.accelerator.is_main_process else None


class FullyShardedDataParallel(DataParallel):
    """FSDP2 (torch's ``fully_shard``) over all processes; see the module docstring."""

    def __init__(self, accelerator):
        super().__init__(accelerator)
        if accelerator.device.type not in ("cpu", "cuda"):
            raise ConfigError(f"sharding=fsdp2 runs on CPU and CUDA devices, not {accelerator.device.type}; use "
                              "sharding=none there")
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def shard(self, model: nn.Module) -> nn.Module:
        """Each repeated block (an element of a ``ModuleList``, e.g. a transformer layer, or of a
        ``Sequential`` of blocks of one kind, e.g. a ResNet stage) becomes its own FSDP unit, gathered
        only while it computes; everything else belongs to the root unit."""
        from torch.distributed.fsdp import fully_shard

        model.to(self.accelerator.device)
        for block in fsdp_blocks(model):
            fully_shard(block, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)
        self.model = model
        return model

    def prepare(self, model, optimizer):
        # Accelerate would wrap the sharded model in DDP and checkpoint rank 0's optimizer shard only.
        self.optimizer = optimizer
        return model, optimizer

    @contextlib.contextmanager
    def no_sync(self, model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    @contextlib.contextmanager
    def evaluation(self, model):
        units = _fsdp_units(model)
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(True, recurse=False)

    def _state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def save(self, folder):
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=Path(folder) / SHARDED_STATE)

    def load(self, folder):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if not (Path(folder) / SHARDED_STATE).is_dir():
            raise ConfigError(f"{folder} has no {SHARDED_STATE}/: it was not written with sharding=fsdp2; resume it "
                              "with the sharding it was saved with")
        state = self._state()
        dcp.load(state, checkpoint_id=Path(folder) / SHARDED_STATE)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    def exportable(self, model, task):
        """Gathers the full state on the main process (in CPU memory) and loads it into a plain, unsharded
        copy of the task's model, so the task exports it as it exports any other."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.accelerator.is_main_process:
            return None
        plain = task.build_model()
        plain.load_state_dict(full)
        return plain


def fsdp_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model`` that hold parameters (see FullyShardedDataParallel.shard), outermost
    first; a block inside a block is not split further."""
    blocks: list[nn.Module] = []
    taken: set[int] = set()
    for module in model.modules():
        if id(module) in taken:
            continue
        children = list(module.children())
        repeated = isinstance(module, nn.ModuleList) or (
            isinstance(module, nn.Sequential) and len(children) > 1 and len({type(c) for c in children}) == 1)
        if not repeated:
            continue
        for child in children:
            if any(True for _ in child.parameters()):
                blocks.append(child)
                taken.update(id(m) for m in child.modules())
    return blocks


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def largest_unit(model: nn.Module) -> int:
    """Parameters of the largest FSDP unit :meth:`FullyShardedDataParallel.shard` makes of ``model`` (a block,
    or the root with everything outside the blocks): what one rank gathers at a time."""
    blocks = [sum(p.numel() for p in block.parameters()) for block in fsdp_blocks(model)]
    root = sum(p.numel() for p in model.parameters()) - sum(blocks)
    return max([root, *blocks])
