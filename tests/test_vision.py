"""Vision: ResNets (torchvision's 18/34/50, the CIFAR ResNet-20), the vision task's views and metrics, the
ImageFolder reader, and the recipes' plans. Fast on a CPU: ResNet-20 on a few hundred images."""

from __future__ import annotations

import json
import logging
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO, lb
from largebatch.errors import ConfigError, DataNotFoundError
from largebatch.models.resnet import ImageClassifier, build_resnet, residual_blocks
from largebatch.train import train

MNIST = ["model=resnet", "data=mnist", "save_checkpoint=false"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: threads only add start-up cost on a busy machine
    yield
    torch.set_num_threads(before)


def losses(run_dir):
    return [
        json.loads(line)["loss"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]


# ----------------------------------------------------------------------------- models
def test_parameter_counts():
    import torchvision

    resnet50 = build_resnet(50, 1000)
    assert sum(p.numel() for p in resnet50.parameters()) == 25_557_032  # torchvision's ResNet-50
    assert sum(p.numel() for p in torchvision.models.resnet50(weights=None).parameters()) == 25_557_032
    assert sum(p.numel() for p in build_resnet(20, 10, small_stem=True).parameters()) == 269_722  # He et al.
    grey = build_resnet(20, 10, in_channels=1, small_stem=True)
    assert grey.conv1.in_channels == 1 and sum(p.numel() for p in grey.parameters()) == 269_722 - 2 * 144
    assert build_resnet(18, 10, in_channels=1).conv1.weight.shape == (64, 1, 7, 7)


def _stem_output(net, x):
    seen = []

    def record(module, inputs, output):
        seen.append(tuple(output.shape))

    net.maxpool.register_forward_hook(record)
    net(x)
    return seen[0]


def test_small_stem_keeps_small_images_at_full_resolution():
    x = torch.randn(2, 1, 28, 28)
    assert _stem_output(build_resnet(18, 10, in_channels=1, small_stem=True), x) == (2, 64, 28, 28)
    assert _stem_output(build_resnet(18, 10, in_channels=1, small_stem=False), x) == (2, 64, 7, 7)
    resnet20 = build_resnet(20, 10, in_channels=1, small_stem=True)
    assert resnet20.conv1.stride == (1, 1) and tuple(resnet20.layer1(resnet20.conv1(x)).shape) == (
        2,
        16,
        28,
        28,
    )


def _shortcut(block, x):
    if hasattr(block, "shortcut"):
        return block.shortcut(x)
    return block.downsample(x) if block.downsample is not None else x


@pytest.mark.parametrize("depth,norm", [(20, "batch"), (20, "none"), (18, "batch"), (50, "batch")])
def test_zero_init_makes_every_block_its_shortcut(depth, norm):
    torch.manual_seed(0)
    net = build_resnet(depth, 10, in_channels=1, small_stem=True, norm=norm)
    inputs = {}
    blocks = residual_blocks(net)
    assert len(blocks) == {20: 9, 18: 8, 50: 16}[depth]

    def record(block, args, out):
        inputs[block] = (args[0].detach(), out.detach())

    for block in blocks:
        block.register_forward_hook(record)
    with torch.no_grad():
        net(torch.randn(4, 1, 16, 16))
        for block, (x, out) in inputs.items():
            assert torch.equal(out, torch.relu(_shortcut(block, x)))
    plain = build_resnet(20, 10, in_channels=1, small_stem=True, zero_init_residual=False)
    block = plain.layer1[0]
    x = torch.randn(4, 16, 8, 8)
    assert not torch.allclose(block(x), torch.relu(x))


def test_batchnorm_and_biases_get_no_decay_and_no_trust_ratio(caplog):
    from largebatch.optim import create_optimizer

    model = ImageClassifier(build_resnet(18, 10, in_channels=1, small_stem=True), (0.5,), (0.5,))
    norm_params = {
        f"{name}.{p}"
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
        for p in ("weight", "bias")
    }
    with caplog.at_level(logging.INFO, logger="largebatch.optim"):
        opt = create_optimizer(model, "lars", 1.0, weight_decay=1e-4)
    groups = {(g["weight_decay"], g["adapt"]): set(g["param_names"]) for g in opt.param_groups}
    assert set(groups) == {(1e-4, True), (0.0, False)}
    assert groups[(0.0, False)] == norm_params | {"net.fc.bias"}
    assert all(
        n.endswith("conv1.weight")
        or n.endswith("conv2.weight")
        or n.startswith("net.layer")
        or n == "net.fc.weight"
        for n in groups[(1e-4, True)]
    )
    assert not any("bn" in n or "downsample.1" in n or n.endswith("bias") for n in groups[(1e-4, True)])
    assert "weight_decay=0 trust_ratio=off" in caplog.text


def test_classifier_loss_is_a_sum_with_top1_top5_and_eval_without_smoothing():
    torch.manual_seed(0)
    model = ImageClassifier(
        build_resnet(20, 10, in_channels=1, small_stem=True), (0.5,), (0.5,), label_smoothing=0.1
    )
    images, labels = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8), torch.arange(6)
    model.eval()
    out = model(images, labels)
    logits = model.net((images.float()[:, None] / 255 - 0.5) / 0.5)
    assert out["loss_sum"].item() == pytest.approx(
        nn.functional.cross_entropy(logits, labels, reduction="sum").item(), rel=1e-5
    )
    assert out["count"] == 6 and 0 <= out["correct"] <= out["correct5"] <= 6
    twin = ImageClassifier(model.net, (0.5,), (0.5,), channels_last=True)  # the GPU layout, same numbers
    twin.eval()
    assert torch.allclose(twin(images, labels)["loss_sum"], out["loss_sum"], rtol=1e-5)


# ----------------------------------------------------------------------------- training
def test_tiny_resnet20_learns_above_chance_in_seconds(compose_cfg, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="largebatch.tasks.vision"):
        summary = train(
            compose_cfg(
                *MNIST,
                "data.max_train=640",
                "epochs=3",
                "optimizer=adamw",
                "optimizer.lr=3e-3",
                "schedule=constant",
                "schedule.warmup_epochs=0",
            ),
            tmp_path,
        )
    assert summary["primary_metric"] == "eval/accuracy"
    assert summary["eval/samples"] == 4 * 64  # eval_max_batches x eval_batch of the 1,000 held-out digits
    assert summary["eval/accuracy"] > 0.3  # chance is 0.1
    assert summary["eval/accuracy"] <= summary["eval/top5"] <= 1.0
    assert "BatchNorm batch: 32 images per device per forward pass" in caplog.text


def test_accumulation_is_one_batch_without_batchnorm_and_not_with_it(compose_cfg, tmp_path):
    common = [
        *MNIST,
        "data.max_train=256",
        "epochs=0.5",
        "log_every=1",
        "optimizer=sgd",
        "optimizer.momentum=0",
        "optimizer.lr=0.05",
        "optimizer.weight_decay=0",
        "schedule=constant",
        "schedule.warmup_epochs=0",
        "eval_max_batches=1",
    ]
    for norm in ("none", "batch"):
        train(compose_cfg(*common, f"model.norm={norm}", "micro_batch=32"), tmp_path / f"{norm}_full")
        train(compose_cfg(*common, f"model.norm={norm}", "micro_batch=4"), tmp_path / f"{norm}_split")
    full, split = losses(tmp_path / "none_full"), losses(tmp_path / "none_split")
    assert len(full) == 4 and split == pytest.approx(full, rel=1e-5)
    # BatchNorm normalises each micro-batch by its own statistics: the step is another function.
    bn_full, bn_split = losses(tmp_path / "batch_full"), losses(tmp_path / "batch_split")
    assert abs(bn_split[0] - bn_full[0]) > 1e-3 * abs(bn_full[0])
    # Ghost BatchNorm over groups of 4: each sample's group is the same however the batch is split
    train(compose_cfg(*common, "model.bn_virtual_batch=4", "micro_batch=32"), tmp_path / "ghost_full")
    train(compose_cfg(*common, "model.bn_virtual_batch=4", "micro_batch=4"), tmp_path / "ghost_split")
    ghost_full, ghost_split = losses(tmp_path / "ghost_full"), losses(tmp_path / "ghost_split")
    assert len(ghost_full) == 4 and ghost_split == pytest.approx(ghost_full, rel=1e-5)
    with pytest.raises(ConfigError, match="bn_virtual_batch=3 does not divide the micro-batch 4"):
        train(compose_cfg(*common, "model.bn_virtual_batch=3", "micro_batch=4"), tmp_path / "ghost_bad")


def test_ghost_batchnorm_is_batchnorm_over_each_group():
    """One group of the whole batch is torch's BatchNorm (output, running statistics, eval); with groups,
    each group is normalised alone, and a split of the batch at group boundaries gives the same gradient."""
    from largebatch.models.resnet import GhostBatchNorm2d

    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5) * 2 + 1
    bn, ghost = torch.nn.BatchNorm2d(3), GhostBatchNorm2d(3, virtual_batch=8)
    assert torch.allclose(ghost(x), bn(x), atol=1e-5)
    assert torch.allclose(ghost.running_mean, bn.running_mean, atol=1e-6)
    assert torch.allclose(ghost.running_var, bn.running_var, atol=1e-5)
    bn.eval(), ghost.eval()
    assert torch.allclose(ghost(x), bn(x), atol=1e-6)

    groups = GhostBatchNorm2d(3, virtual_batch=4)
    out = groups(x)
    assert torch.allclose(out[:4], torch.nn.functional.batch_norm(x[:4], None, None, training=True), atol=1e-5)
    weight = torch.randn(8, 3, 5, 5)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def grads(chunks: int) -> torch.Tensor:
        conv.zero_grad()
        for part, w in zip(x.chunk(chunks), weight.chunk(chunks)):
            (groups(conv(part)) * w).sum().backward()
        return conv.weight.grad.clone()

    assert torch.allclose(grads(1), grads(2), atol=1e-5)
    with pytest.raises(ValueError, match="does not split into virtual batches of 4"):
        groups(x[:6])


def test_augmentation_is_a_function_of_seed_epoch_and_index(compose_cfg):
    from largebatch.data.augment import SmallImages
    from largebatch.plan import build_plans
    from largebatch.tasks import build_task

    images = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    labels = torch.arange(10)

    def view(seed=0, epoch=0, flip=True, order=range(10)):
        data = SmallImages(images, labels, seed=seed, padding=4, flip=flip, augment=True)
        data.set_epoch(epoch)
        return {i: data[i]["images"] for i in order}

    first = view()
    assert all(v.shape == (1, 28, 28) and v.dtype == torch.uint8 for v in first.values())
    assert all(torch.equal(first[i], v) for i, v in view(order=reversed(range(10))).items())  # order-free
    assert sum(not torch.equal(first[i], v) for i, v in view(epoch=1).items()) >= 8
    assert sum(not torch.equal(first[i], v) for i, v in view(seed=1).items()) >= 8
    state = torch.get_rng_state()
    view()
    assert torch.equal(state, torch.get_rng_state())  # the global generator is untouched
    # No padding: the only change left is the flip, never applied to digits.
    same = SmallImages(images, labels, seed=0, padding=0, flip=False, augment=True)
    assert all(torch.equal(same[i]["images"][0], images[i]) for i in range(10))
    flipped = SmallImages(images, labels, seed=0, padding=0, flip=True, augment=True)
    assert any(torch.equal(flipped[i]["images"][0], images[i].flip(-1)) for i in range(10))

    # A batch ladder sees the same augmented samples: batch 8 in 2 steps = batch 16 in one; a run resumed
    # at step 9 (the second epoch of 8 steps) sees what an uninterrupted one sees there.
    def images_from(batch, micro, start_step=0, steps=1):
        cfg = compose_cfg(*MNIST, "data.max_train=64", f"batch={batch}", f"micro_batch={micro}")
        task = build_task(cfg)
        it = task.steps(
            build_plans(cfg, task, 1)[0], stage_index=0, rank=0, world_size=1, start_step=start_step
        )
        return [torch.cat([mb["images"] for mb in next(it)]) for _ in range(steps)]

    assert torch.equal(torch.cat(images_from(8, 4, steps=2)), images_from(16, 16)[0])
    assert torch.equal(images_from(8, 8, steps=10)[9], images_from(8, 8, start_step=9)[0])


# ----------------------------------------------------------------------------- ImageFolder
def write_image_folder(root, classes=("ant", "bee", "cat"), train_per_class=12, val_per_class=4):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (70 + i, 80, 3), dtype=np.uint8)
                pixels[..., c] += 180  # one dominant colour per class: learnable
                suffix = ".JPEG" if i % 2 else ".png"
                Image.fromarray(pixels).save(root / split / name / f"{split}_{i}{suffix}")
    return root


def test_image_folder_trains_with_top5_and_deterministic_crops(compose_cfg, tmp_path):
    from largebatch.data.augment import FolderImages
    from largebatch.data.images import load_image_folder

    folder = write_image_folder(tmp_path / "imagenet")
    splits = load_image_folder(folder)
    assert (
        splits.classes == ["ant", "bee", "cat"]
        and len(splits.train_files) == 36
        and len(splits.eval_files) == 12
    )
    assert splits.train_labels.tolist() == [0] * 12 + [1] * 12 + [2] * 12
    assert len(load_image_folder(folder, max_train=10).train_files) == 10
    data = FolderImages(splits.train_files, splits.train_labels, seed=0, size=32, resize=36, train=True)
    state = torch.get_rng_state()
    a, b = data[3]["images"], data[3]["images"]
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8 and torch.equal(a, b)
    assert torch.equal(state, torch.get_rng_state())
    data.set_epoch(1)
    assert not torch.equal(a, data[3]["images"])
    summary = train(
        compose_cfg(
            "model=resnet",
            "data=imagefolder",
            f"data.folder={folder}",
            "model.image_size=32",
            "model.eval_resize=36",
            "batch=12",
            "epochs=2",
            "save_checkpoint=false",
        ),
        tmp_path / "run",
    )
    assert summary["eval/samples"] == 12 and summary["eval/top5"] == 1.0  # 3 classes: top-5 is everything
    assert 0 <= summary["eval/accuracy"] <= 1


def test_image_folder_errors_name_the_folder_or_file(compose_cfg, tmp_path):
    from largebatch.data.images import load_image_folder, read_image
    from largebatch.tasks import build_task

    with pytest.raises(ConfigError, match="data.folder="):
        load_image_folder(None)
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "nowhere" / "train")):
        load_image_folder(tmp_path / "nowhere")
    (tmp_path / "flat" / "train").mkdir(parents=True)
    (tmp_path / "flat" / "val").mkdir()
    (tmp_path / "flat" / "train" / "x.JPEG").write_bytes(b"")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'flat' / 'train'} has no class folders"):
        load_image_folder(tmp_path / "flat")
    folder = write_image_folder(tmp_path / "odd", train_per_class=1, val_per_class=1)
    (folder / "val" / "dog").mkdir()
    with pytest.raises(ConfigError, match="dog"):
        load_image_folder(folder)
    bad = tmp_path / "corrupt.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ConfigError, match="corrupt.JPEG: not a readable image"):
        read_image(bad)
    with pytest.raises(ConfigError, match="trains on data=fashion_mnist | data=mnist | data=imagefolder"):
        build_task(compose_cfg("model=resnet", "data=ptb"))


def test_bad_inputs_are_one_line_each(compose_cfg, tmp_path, monkeypatch):
    from largebatch.data import images
    from largebatch.tasks import build_task

    for override, message in [
        ("model.depth=101", "model.depth=101"),
        ("model.norm=group", "model.norm"),
        ("model.small_stem=false", "always has the small stem"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_task(compose_cfg("model=resnet", "data=mnist", "model.depth=20", override))
    monkeypatch.setattr(images, "FASHION_MNIST_DIR", tmp_path / "not-installed")
    with pytest.raises(DataNotFoundError, match="sudo apt-get install dataset-fashion-mnist"):
        build_task(compose_cfg("model=resnet", "data=fashion_mnist")).train_samples(
            32, None, allow_declared=False
        )
    with pytest.raises(ConfigError, match="model.num_classes=5 but"):
        build_task(compose_cfg("model=resnet", "data=mnist", "model.num_classes=5")).train_samples(
            32, None, allow_declared=False
        )


def test_corrupt_image_stops_lb_train_with_one_line_naming_it(tmp_path):
    folder = write_image_folder(tmp_path / "imagenet", train_per_class=2, val_per_class=1)
    (folder / "train" / "bee" / "zz_broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    proc = subprocess.run(
        [
            lb("lb-train"),
            "scale=tiny",
            "model=resnet",
            "data=imagefolder",
            f"data.folder={folder}",
            "model.image_size=16",
            "model.eval_resize=18",
            "batch=7",
            "progress=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.splitlines()[-1]  # checked up front, before training, and named
    assert last.startswith("error: 1 image file(s) cannot be read:") and "zz_broken.JPEG (OSError" in last


# ----------------------------------------------------------------------------- recipes
def test_goyal_plan_at_8k(capsys):
    from largebatch.cli import plan_main

    plan_main(["--json", "experiment=resnet50_goyal", "batch=256,8192"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["batch"], r["lr"], r["warmup_epochs"]) for r in rows] == [(256, 0.1, 5.0), (8192, 3.2, 5.0)]
    assert rows[1]["steps_per_epoch"] == 156 and rows[1]["total_steps"] == 90 * 156 == 14_040
    assert rows[1]["warmup_steps"] == 5 * 156 and rows[1]["micro_batch"] == 32  # Goyal's BN batch
    assert {r["scaling"] for r in rows} == {"linear"} and {r["schedule"] for r in rows} == {"step"}


def test_lars_and_lamb_recipes_plan(capsys):
    from largebatch.cli import plan_main

    plan_main(["--json", "experiment=resnet50_mlperf_lars"])
    plan_main(["--json", "experiment=resnet50_lamb"])
    mlperf, lamb = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (mlperf["optimizer"], mlperf["batch"], mlperf["lr"], mlperf["warmup_epochs"]) == (
        "lars_mlperf",
        3264,
        10.5,
        2.0,
    )
    assert (lamb["optimizer"], lamb["batch"], lamb["lr"]) == ("lamb", 32768, 0.04)
    assert (lamb["warmup_steps"], lamb["total_steps"]) == (782, 3519)  # the authors' 32k run
