"""BatchNorm recalibration: the running statistics it leaves against statistics computed
directly from the BatchNorm inputs, what it restores, and that it repairs a pruned model."""

import copy

import pytest
import torch
from tiny import TinyDetectionData, tiny_model
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import default_collate

from ctprune.pruning.recalibrate import recalibrate_bn
from detector.engine.config import TrainConfig
from detector.engine.train import train_loader


def _loader():
    config = TrainConfig(batch_size=4, workers=0)
    return train_loader(TinyDetectionData(12), config, collate_fn=default_collate)


def _batchnorms(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def _corrupt(model, mean, variance):
    for _, norm in _batchnorms(model):
        norm.running_mean.fill_(mean)
        norm.running_var.fill_(variance)
        norm.num_batches_tracked.fill_(1000)


def _reference_statistics(model, images_per_batch):
    """For each BatchNorm: the average over batches of the per-channel mean and unbiased
    variance of its input over N x H x W, recorded by hooks on a train-mode copy (whose
    running statistics are never read in train mode)."""
    model = copy.deepcopy(model).train()
    sums = {}

    def record(name):
        def hook(module, inputs):
            features = inputs[0].double()  # B x C x H x W
            mean = features.mean(dim=(0, 2, 3))
            variance = features.var(dim=(0, 2, 3), unbiased=True)
            total_mean, total_variance = sums.get(name, (0.0, 0.0))
            sums[name] = (total_mean + mean, total_variance + variance)

        return hook

    for name, norm in _batchnorms(model):
        norm.register_forward_pre_hook(record(name))
    with torch.no_grad():
        for images in images_per_batch:
            model(images)
    count = len(images_per_batch)
    return {name: (mean / count, variance / count) for name, (mean, variance) in sums.items()}


def test_recalibration_recovers_the_statistics_of_the_data():
    model = tiny_model().eval()
    loader = _loader()
    reference = _reference_statistics(model, [batch["image"] for batch in loader])
    _corrupt(model, mean=5.0, variance=100.0)
    recalibrate_bn(model, loader, batches=20)  # the loader has 3 batches: all are used
    for name, norm in _batchnorms(model):
        mean, variance = reference[name]
        tolerances = dict(rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(norm.running_mean.double(), mean, **tolerances)
        torch.testing.assert_close(norm.running_var.double(), variance, **tolerances)
        assert norm.num_batches_tracked.item() == 3


def test_old_statistics_leave_no_trace_and_plain_tensors_work():
    model = tiny_model()
    loader = _loader()
    tensors = [batch["image"] for batch in loader]
    results = []
    for corruption, source in [((5.0, 100.0), loader), ((-3.0, 0.01), tensors)]:
        _corrupt(model, *corruption)
        recalibrate_bn(model, source, batches=2)
        results.append([(n.running_mean.clone(), n.running_var.clone())
                        for _, n in _batchnorms(model)])
    for (mean_a, var_a), (mean_b, var_b) in zip(*results, strict=True):
        torch.testing.assert_close(mean_a, mean_b, rtol=0, atol=1e-6)
        torch.testing.assert_close(var_a, var_b, rtol=0, atol=1e-6)
    assert all(norm.num_batches_tracked.item() == 2 for _, norm in _batchnorms(model))


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_momentum_and_modes_are_restored(mode):
    model = tiny_model().train(mode == "train")
    if mode == "mixed":
        model.neck.train()  # a partly frozen model: only the neck trains
    model.backbone.bn1.momentum = 0.3
    modes = {name: module.training for name, module in model.named_modules()}
    momenta = {name: norm.momentum for name, norm in _batchnorms(model)}
    recalibrate_bn(model, _loader(), batches=1)
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert {name: norm.momentum for name, norm in _batchnorms(model)} == momenta


def test_bad_batches_and_empty_loaders_are_clear_errors_that_keep_the_old_statistics():
    model = tiny_model()
    _corrupt(model, mean=5.0, variance=100.0)
    with pytest.raises(ValueError, match="yielded no batches"):
        recalibrate_bn(model, [], batches=3)
    with pytest.raises(ValueError, match="needs an 'image' key, got keys \\['heatmap'\\]"):
        recalibrate_bn(model, [{"heatmap": torch.zeros(1)}])
    with pytest.raises(TypeError, match="got str"):
        recalibrate_bn(model, ["image.jpg"])
    with pytest.raises(ValueError, match="batches: expected an integer >= 1, got 0"):
        recalibrate_bn(model, _loader(), batches=0)
    for _, norm in _batchnorms(model):
        assert torch.all(norm.running_mean == 5.0) and torch.all(norm.running_var == 100.0)
        assert norm.momentum == 0.1


@torch.no_grad()
def _remove_channels(conv: nn.Conv2d, norm: nn.BatchNorm2d, consumer: nn.Conv2d, keep) -> None:
    """Structured pruning of one conv -> BN -> ReLU -> conv chain: keep ``keep`` channels."""
    conv.weight = nn.Parameter(conv.weight[keep].clone())
    conv.out_channels = len(keep)
    for name in ("weight", "bias"):
        setattr(norm, name, nn.Parameter(getattr(norm, name)[keep].clone()))
    norm.running_mean = norm.running_mean[keep].clone()
    norm.running_var = norm.running_var[keep].clone()
    norm.num_features = len(keep)
    consumer.weight = nn.Parameter(consumer.weight[:, keep].clone())
    consumer.in_channels = len(keep)


def _eval_train_gap(model, images):
    """How far eval mode (running statistics) is from train mode (batch statistics) on the
    same images; the train-mode pass runs on a copy so no running statistic moves."""
    with torch.no_grad():
        evaluated = model.eval()(images)[0]
        trained = copy.deepcopy(model).train()(images)[0]
    return sum((evaluated[k] - trained[k]).abs().mean().item() for k in evaluated)


def test_recalibration_repairs_the_statistics_of_a_pruned_model():
    model = tiny_model()
    # One batch of all 12 images: at layer4's 2 x 2 px, the unbiased variance kept as running
    # statistic is 48 / 47 of the biased one train mode normalises with (16 / 15 with 4 images).
    images = torch.cat([batch["image"] for batch in _loader()])
    with torch.no_grad():
        for _, norm in _batchnorms(model):  # distinct gammas, so which channels go matters
            norm.weight.uniform_(0.2, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    # Statistics of the unpruned model from the very batch the gap is measured on, so eval and
    # train mode agree up to the unbiased-variance factor; a larger gap comes from pruning.
    recalibrate_bn(model, [images])
    unpruned = _eval_train_gap(model, images)
    # Prune half of the channels inside every basic block (conv1 -> bn1 -> conv2), keeping
    # the largest |gamma|: each block's bn2, and every BatchNorm after it, sees new inputs.
    blocks = [m for name, m in model.backbone.named_modules() if name.count(".") == 1]
    assert len(blocks) == 8
    for block in blocks:
        largest = block.bn1.weight.abs().argsort(descending=True)
        keep = largest[: block.bn1.num_features // 2].sort().values
        _remove_channels(block.conv1, block.bn1, block.conv2, keep)
    stale = _eval_train_gap(model, images)
    recalibrate_bn(model, [images])
    recalibrated = _eval_train_gap(model, images)
    assert stale > 5 * unpruned
    assert recalibrated < 0.1 * stale  # measured: 0.0037 unpruned, 0.055 stale, 0.0040 recalibrated
