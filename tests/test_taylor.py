"""The Taylor criterion on tiny models: parity with torch-pruning's GroupTaylorImportance (plus
the BatchNorm term ctprune adds), the dead-consumer channel it ranks last where L1 ranks it
first, and its use through `prune(..., data=...)`."""

import pytest
import torch
import torch_pruning as tp
from test_pruning_invariants import EXAMPLE, groups_of, randomised
from tiny import TinyDetectionData
from torch import nn

from ctprune.pruning import prune
from ctprune.pruning.criteria import l1
from ctprune.pruning.graph import build_graph, input_filters
from ctprune.pruning.taylor import accumulate_gradients, hessian, taylor
from cuda_ops import ModulatedDeformConv2d
from detector.losses import centernet_loss

pytestmark = pytest.mark.timeout(60)


def batches(count: int = 2, size: int = 2) -> list[dict]:
    data = TinyDetectionData(length=count * size, seed=3)
    loader = torch.utils.data.DataLoader(data, batch_size=size)
    return list(loader)


def test_taylor_matches_torch_pruning_plus_batchnorm():
    model = randomised("res18")
    groups = groups_of(model)
    accumulate_gradients(model, batches(), centernet_loss)
    graph = build_graph(model, EXAMPLE)
    # torch-pruning's scores summed over layers, unnormalised; its BatchNorm term never runs.
    reference = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
    checked = 0
    for group in groups:
        if not isinstance(group.root, nn.Conv2d) or group.root.groups > 1:
            continue
        tp_group = graph.get_pruning_group(
            group.root, tp.prune_conv_out_channels, list(range(group.width))
        )
        expected = reference(tp_group).double()
        norms = [layer for layer in group.norms if layer.module.weight is not None]
        for layer in norms:  # the BatchNorm term ctprune adds, by hand
            gamma = layer.module.weight.detach()[layer.channels]
            expected += (gamma * layer.module.weight.grad[layer.channels]).abs().double()
        count = len(group.producers) + len(group.consumers) + len(norms)
        assert torch.allclose(taylor(group).double() * count, expected, rtol=1e-4), group.name
        checked += 1
    assert checked >= 5


def test_input_filters_of_a_grouped_conv():
    # 4 input channels in 2 groups, 6 outputs: input channel 3 is read by outputs 3..5 at
    # column 1 of their (out x in/groups) block.
    conv = nn.Conv2d(4, 6, 1, groups=2, bias=False)
    from ctprune.pruning.graph import LayerSlice

    rows = input_filters(LayerSlice("conv", conv, torch.tensor([3, 0])))
    weight = conv.weight.detach()[:, :, 0, 0]
    assert torch.equal(rows[0], weight[3:6, 1])
    assert torch.equal(rows[1], weight[0:3, 0])


def test_dead_consumers_rank_a_heavy_channel_last_for_taylor_and_first_for_l1():
    model = randomised("res18")
    group = next(g for g in groups_of(model) if g.name == "neck.0")
    channel = 5
    with torch.no_grad():
        for layer in group.producers:  # heavy filters: L1's favourite
            dim = 1 if isinstance(layer.module, nn.ConvTranspose2d) else 0
            layer.module.weight.narrow(dim, int(layer.channels[channel]), 1).mul_(100)
        for layer in group.consumers:  # ... that nothing reads
            weight = layer.module.weight
            dim = 0 if isinstance(layer.module, nn.ConvTranspose2d) else 1
            weight.narrow(dim, int(layer.channels[channel]), 1).zero_()
    l1_scores = l1(group)
    assert int(l1_scores.argmax()) == channel
    accumulate_gradients(model, batches(), centernet_loss)
    taylor_scores = taylor(group)
    assert float(taylor_scores[channel]) == 0.0
    assert int(taylor_scores.argmin()) == channel
    assert bool((taylor_scores[torch.arange(group.width) != channel] > 0).all())
    # Through prune(), the group losing a quarter of its channels: taylor drops the heavy
    # channel, l1 keeps it.
    for criterion, data, kept in [("taylor", batches(), False), ("l1", None, True)]:
        result = prune(model, 0.25, criterion, example_inputs=EXAMPLE, round_to=None, data=data,
                       ratio_overrides={"neck.0": 0.25})
        pruned = next(g for g in groups_of(result.model) if g.name == "neck.0")
        assert pruned.width == group.width - group.width // 4
        scores = l1(pruned)
        assert bool(scores.max() > 20 * scores.median()) == kept, criterion


def test_prune_with_taylor_leaves_no_gradients_and_checks_data():
    model = randomised("res18")
    result = prune(model, 0.3, "taylor", example_inputs=EXAMPLE, round_to=None, data=batches(1))
    assert all(p.grad is None for p in result.model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert result.stats.params_after < result.stats.params_before
    with pytest.raises(ValueError, match="data: the taylor criterion needs calibration"):
        prune(model, 0.3, "taylor", example_inputs=EXAMPLE)
    with pytest.raises(ValueError, match="data: the l1 criterion reads no data"):
        prune(model, 0.3, "l1", example_inputs=EXAMPLE, data=batches(1))
    with pytest.raises(ValueError, match=r"data\[0\]: expected a training batch"):
        prune(model, 0.3, "taylor", example_inputs=EXAMPLE, data=[torch.zeros(1, 3, 64, 64)])


@pytest.mark.parametrize("arch", ["resdcn18", "hourglass104", "dla34", "mobilenet_v3_large"])
def test_taylor_scores_every_group_of_other_families(arch):
    # Deformable convs (gradients outside the trace's detached offsets), two hourglass stacks,
    # DLA's depthwise upsampling and roots, MobileNet's depthwise convs: every group gets a
    # finite score per channel, not all equal.
    model = randomised(arch)
    accumulate_gradients(model, batches(1), centernet_loss)
    for module in model.modules():  # offsets took part in the backward (no tracing context)
        if isinstance(module, ModulatedDeformConv2d):
            assert float(module.conv_offset_mask.weight.grad.abs().sum()) > 0
    for group in groups_of(model):
        scores = taylor(group)
        assert scores.shape == (group.width,) and bool(torch.isfinite(scores).all()), group.name
    live = [g for g in groups_of(model) if g.width > 1 and bool((taylor(g) > 0).any())]
    assert len(live) >= len(groups_of(model)) // 2


def test_hessian_is_weights_squared_times_the_empirical_fisher():
    model = randomised("res18")
    data = batches(1, size=2)
    group = next(g for g in groups_of(model) if g.name == "backbone.layer1.0.conv1")
    assert [len(group.producers), len(group.norms), len(group.consumers)] == [1, 1, 1]
    conv, norm, reader = (group.producers[0].module, group.norms[0].module,
                          group.consumers[0].module)
    # Reference by hand: each image's squared gradient, averaged (the empirical Fisher).
    fisher = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    model.eval()
    for index in range(2):
        single = {k: v[index:index + 1] for k, v in data[0].items() if torch.is_tensor(v)}
        model.zero_grad()
        centernet_loss(model(single["image"]), single)[0].backward()
        for name, parameter in model.named_parameters():
            fisher[name] += parameter.grad.pow(2) / 2
    accumulate_gradients(model, data, centernet_loss, squared=True)
    assert torch.allclose(conv.weight.grad, fisher["backbone.layer1.0.conv1.weight"], rtol=1e-4)
    expected = (
        (conv.weight.detach().pow(2) * fisher["backbone.layer1.0.conv1.weight"]).sum((1, 2, 3))
        + norm.weight.detach().pow(2) * fisher["backbone.layer1.0.bn1.weight"]
        + (reader.weight.detach().pow(2) * fisher["backbone.layer1.0.conv2.weight"]).sum((0, 2, 3))
    ) / 3
    assert torch.allclose(hessian(group), expected, rtol=1e-4)
    result = prune(model, 0.25, "hessian", example_inputs=EXAMPLE, round_to=None, data=data)
    assert result.stats.params_after < result.stats.params_before
