"""cuda_ops: the deformable conv and the corner/center poolings against their slow references,
hand-computed cases, gradients (float64 gradcheck), the DCN's FLOP formula, and the poolings'
export-safe form (torch.export and ONNX without cummax)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cuda_ops import (
    FLOP_FORMULAS,
    BottomPool,
    CenterPool,
    LeftPool,
    ModulatedDeformConv2d,
    RightPool,
    TopPool,
    bottom_pool,
    center_pool,
    left_pool,
    modulated_deform_conv2d,
    modulated_deform_conv2d_reference,
    right_pool,
    top_pool,
)
from cuda_ops import corner_pool as corner_pool_module
from detector import count_macs

DOUBLE = torch.float64


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _random_case(
    batch=2, channels=4, out_channels=5, size=(7, 6), kernel=3, stride=1, padding=1,
    dilation=1, groups=1, dtype=DOUBLE, seed=0,
):
    """Random input, weight and bias, and offsets of a few pixels (fractional, some taps
    falling outside the image) with masks in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    out_h = _output_size(size[0], kernel, stride, padding, dilation)
    out_w = _output_size(size[1], kernel, stride, padding, dilation)
    taps = kernel * kernel

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    return {
        "input": randn(batch, channels, *size),
        "offset": 2 * randn(batch, 2 * groups * taps, out_h, out_w),
        "mask": torch.rand(batch, groups * taps, out_h, out_w, generator=generator, dtype=dtype),
        "weight": randn(out_channels, channels, kernel, kernel),
        "bias": randn(out_channels),
    }


CONFIGS = [
    {},
    {"stride": 2},
    {"padding": 2, "dilation": 2},
    {"groups": 2},
    {"kernel": 1, "padding": 0},
    {"stride": 2, "padding": 0, "groups": 4, "size": (8, 5)},
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_deform_conv_matches_the_reference(config):
    config = dict(config)
    stride, padding, dilation = (config.get(k, d) for k, d in (("stride", 1), ("padding", 1),
                                                                ("dilation", 1)))
    case = _random_case(**config)
    expected = modulated_deform_conv2d_reference(**case, stride=stride, padding=padding,
                                                 dilation=dilation)
    actual = modulated_deform_conv2d(**case, stride=stride, padding=padding, dilation=dilation)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_deform_conv_without_bias_and_with_rectangular_arguments():
    case = _random_case(size=(9, 7), stride=1, padding=1)
    case["bias"] = None
    case["offset"] = case["offset"][..., :4, :]  # output 4 x 7 with stride (2, 1), pad (0, 1)
    case["mask"] = case["mask"][..., :4, :]
    arguments = {"stride": (2, 1), "padding": (0, 1), "dilation": (1, 1)}
    torch.testing.assert_close(
        modulated_deform_conv2d(**case, **arguments),
        modulated_deform_conv2d_reference(**case, **arguments),
        rtol=1e-10,
        atol=1e-10,
    )


@pytest.mark.parametrize("shift", [(1, 0), (0, -2), (-1, 1)])
def test_integer_offsets_shift_the_input_by_hand(shift):
    """Every tap moved by (dy, dx) whole pixels, mask 1: a plain conv of the input shifted by
    (dy, dx), zero-filled. Pins the layout: channel 2t is the row shift, 2t + 1 the column."""
    dy, dx = shift
    case = _random_case(batch=1, size=(6, 6))
    taps = 9
    offset = torch.zeros(1, 2 * taps, 6, 6, dtype=DOUBLE)
    offset[:, 0::2] = dy
    offset[:, 1::2] = dx
    mask = torch.ones(1, taps, 6, 6, dtype=DOUBLE)
    # Output (y, x), tap (i, j) reads input[y - 1 + i + dy, x - 1 + j + dx], 0 outside: an
    # unpadded conv over the window of the zero-padded input that starts at (dy - 1, dx - 1).
    margin = 3
    padded = F.pad(case["input"], (margin,) * 4)
    top, left = margin + dy - 1, margin + dx - 1
    window = padded[..., top : top + 6 + 2, left : left + 6 + 2]
    expected = F.conv2d(window, case["weight"], case["bias"])
    actual = modulated_deform_conv2d(
        case["input"], offset, mask, case["weight"], case["bias"], stride=1, padding=1
    )
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_half_pixel_offset_averages_two_neighbours_by_hand():
    # A 1x1 kernel moved half a pixel right reads (x[y, x] + x[y, x + 1]) / 2; the last column
    # reads half its value (its right neighbour is outside: 0).
    image = torch.arange(12, dtype=DOUBLE).view(1, 1, 3, 4)
    offset = torch.zeros(1, 2, 3, 4, dtype=DOUBLE)
    offset[:, 1] = 0.5
    mask = torch.ones(1, 1, 3, 4, dtype=DOUBLE)
    weight = torch.ones(1, 1, 1, 1, dtype=DOUBLE)
    expected = torch.tensor([[0.5, 1.5, 2.5, 1.5], [4.5, 5.5, 6.5, 3.5], [8.5, 9.5, 10.5, 5.5]],
                            dtype=DOUBLE)
    for function in (modulated_deform_conv2d, modulated_deform_conv2d_reference):
        torch.testing.assert_close(function(image, offset, mask, weight)[0, 0], expected)


def test_gradcheck_float64():
    case = _random_case(batch=1, channels=2, out_channels=2, size=(4, 4), groups=2)
    # Keep sampling positions away from integer coordinates, where bilinear interpolation has
    # a kink and finite differences disagree with any derivative.
    case["offset"] = torch.floor(case["offset"]) + 0.3
    inputs = tuple(case[k].requires_grad_() for k in ("input", "offset", "mask", "weight", "bias"))
    assert torch.autograd.gradcheck(
        lambda *tensors: modulated_deform_conv2d(*tensors, stride=1, padding=1), inputs
    )


def _original_dcn_forward(module: ModulatedDeformConv2d, x: torch.Tensor) -> torch.Tensor:
    """The original DCN's forward, step by step: chunk the offset/mask conv's output in three,
    concatenate the first two as offsets, sigmoid the third as mask; the reference op."""
    o1, o2, mask_logits = torch.chunk(module.conv_offset_mask(x), 3, dim=1)
    offset = torch.cat((o1, o2), dim=1)
    return modulated_deform_conv2d_reference(
        x, offset, torch.sigmoid(mask_logits), module.weight, module.bias,
        module.stride, module.padding, module.dilation,
    )


@pytest.mark.parametrize("groups, stride", [(1, 1), (2, 2)])
def test_module_matches_the_original_dcn_with_learnt_offsets(groups, stride):
    module = ModulatedDeformConv2d(4, 6, 3, stride=stride, padding=1, deformable_groups=groups)
    module = module.double()
    with torch.no_grad():  # non-zero offsets and masks, as after training
        module.conv_offset_mask.weight.normal_(std=0.3)
        module.conv_offset_mask.bias.normal_(std=0.5)
        module.bias.normal_()
    x = torch.randn(2, 4, 8, 7, dtype=DOUBLE)
    expected = _original_dcn_forward(module, x)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)
    offset, _ = module.offset_and_mask(x)
    assert offset.abs().max() > 1  # the check samples between and beyond pixels


def test_module_at_initialisation_is_half_a_plain_conv():
    module = ModulatedDeformConv2d(4, 6, 3, padding=1)
    assert torch.all(module.conv_offset_mask.weight == 0)
    assert torch.all(module.conv_offset_mask.bias == 0)
    assert torch.all(module.bias == 0)
    bound = 1 / (4 * 3 * 3) ** 0.5
    assert module.weight.abs().max() <= bound
    x = torch.randn(2, 4, 9, 9)
    # The mask is sigmoid(0) = 0.5 and the offsets 0: 0.5 x conv(x) + bias.
    expected = 0.5 * F.conv2d(x, module.weight, padding=1)
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-6)


def test_module_state_dict_keys_are_the_originals():
    module = ModulatedDeformConv2d(4, 6, 3, padding=1)
    shapes = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    assert shapes == {
        "weight": (6, 4, 3, 3),
        "bias": (6,),
        "conv_offset_mask.weight": (27, 4, 3, 3),
        "conv_offset_mask.bias": (27,),
    }
    # The reference's per-DCN parameter count: out*in*9 + out + in*27*9 + 27.
    assert sum(p.numel() for p in module.parameters()) == 6 * 4 * 9 + 6 + 4 * 27 * 9 + 27


def test_module_backward_reaches_the_offset_conv():
    module = ModulatedDeformConv2d(3, 4, 3, padding=1)
    module(torch.randn(1, 3, 6, 6)).sum().backward()
    assert all(p.grad is not None for p in module.parameters())
    assert module.conv_offset_mask.weight.grad.abs().sum() > 0


def test_module_runs_on_the_meta_device():
    with torch.device("meta"):
        module = ModulatedDeformConv2d(4, 6, 3, stride=2, padding=1)
        output = module(torch.empty(1, 4, 9, 9))
    assert output.shape == (1, 6, 5, 5) and output.is_meta


def test_bad_shapes_are_named():
    case = _random_case(batch=1)
    with pytest.raises(ValueError, match="offset has 17 channels"):
        modulated_deform_conv2d(case["input"], case["offset"][:, :17], case["mask"],
                                case["weight"], padding=1)
    with pytest.raises(ValueError, match="mask has 8 channels"):
        modulated_deform_conv2d(case["input"], case["offset"], case["mask"][:, :8],
                                case["weight"], padding=1)
    with pytest.raises(ValueError, match=r"mask has shape \(1, 9, 7, 5\).*\(7, 6\)"):
        modulated_deform_conv2d(case["input"], case["offset"], case["mask"][..., :5],
                                case["weight"], padding=1)
    with pytest.raises(ValueError, match="input has 4 channels but the weight reads 3"):
        modulated_deform_conv2d(case["input"], case["offset"], case["mask"],
                                case["weight"][:, :3], padding=1)
    with pytest.raises(ValueError, match="deformable_groups"):
        ModulatedDeformConv2d(5, 4, 3, deformable_groups=2)


def test_flop_formula_counts_a_plain_conv_of_the_same_shape():
    case = _random_case(batch=2, channels=4, out_channels=5, size=(7, 6), groups=2)
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        modulated_deform_conv2d(**case, padding=1)
    # 2 x batch x out_channels x 7 x 6 output values x (4 in x 3 x 3) multiply-accumulates.
    assert counter.get_total_flops() == 2 * (2 * 5 * 7 * 6) * (4 * 3 * 3)


@pytest.mark.parametrize("stride", [1, 2])
def test_count_macs_includes_the_deformable_conv(stride):
    model = nn.Sequential(ModulatedDeformConv2d(3, 6, 3, stride=stride, padding=1))
    side = 8 // stride
    deform = 6 * side * side * 3 * 9  # out x H x W x (in x 3 x 3)
    offset_conv = 27 * side * side * 3 * 9  # 3 x 9 taps outputs, same inputs
    assert count_macs(model, (8, 8)) == deform + offset_conv


# Corner and center pooling.

POOLS = [
    (top_pool, corner_pool_module.top_pool_reference, TopPool),
    (bottom_pool, corner_pool_module.bottom_pool_reference, BottomPool),
    (left_pool, corner_pool_module.left_pool_reference, LeftPool),
    (right_pool, corner_pool_module.right_pool_reference, RightPool),
]
POOL_IDS = ["top", "bottom", "left", "right"]
ALL_POOLS = [pool for pool, _, _ in POOLS] + [center_pool]
ALL_POOL_IDS = POOL_IDS + ["center"]


@pytest.mark.parametrize("pool, reference, module", POOLS, ids=POOL_IDS)
def test_corner_pools_match_their_references(pool, reference, module):
    x = torch.randn(2, 3, 5, 7)
    torch.testing.assert_close(pool(x), reference(x), rtol=0, atol=0)
    torch.testing.assert_close(module()(x), pool(x), rtol=0, atol=0)


def test_corner_pools_by_hand():
    x = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [4.0, 2.0, 0.0]]).view(1, 1, 3, 3)
    assert top_pool(x)[0, 0].tolist() == [[4, 5, 2], [4, 5, 1], [4, 2, 0]]
    assert bottom_pool(x)[0, 0].tolist() == [[3, 1, 2], [3, 5, 2], [4, 5, 2]]
    assert left_pool(x)[0, 0].tolist() == [[3, 2, 2], [5, 5, 1], [4, 2, 0]]
    assert right_pool(x)[0, 0].tolist() == [[3, 3, 3], [0, 5, 5], [4, 4, 4]]
    # Column max + row max: columns (4, 5, 2), rows (3, 5, 4).
    assert center_pool(x)[0, 0].tolist() == [[7, 8, 5], [9, 10, 7], [8, 9, 6]]


def test_center_pool_matches_its_reference_with_two_branches():
    vertical, horizontal = torch.randn(2, 3, 5, 6), torch.randn(2, 3, 5, 6)
    expected = corner_pool_module.center_pool_reference(vertical, horizontal)
    torch.testing.assert_close(center_pool(vertical, horizontal), expected, rtol=0, atol=0)
    torch.testing.assert_close(CenterPool()(vertical, horizontal), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="same shape"):
        center_pool(vertical, horizontal[..., :5])


@pytest.mark.parametrize("pool", ALL_POOLS, ids=ALL_POOL_IDS)
def test_pools_gradcheck_float64(pool):
    # Random values have no ties, where max pooling's gradient is not defined.
    x = torch.randn(1, 2, 4, 5, dtype=DOUBLE, requires_grad=True)
    assert torch.autograd.gradcheck(pool, (x,))


def test_pools_refuse_other_shapes():
    with pytest.raises(ValueError, match="B x C x H x W"):
        top_pool(torch.randn(3, 4, 5))


# The export-safe form: the log-step running max (pad/slice/maximum), which ONNX translates.

SIZES = [(1, 1), (1, 6), (2, 3), (5, 7), (8, 8), (9, 17)]


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
@pytest.mark.parametrize("pool, reference, module", POOLS, ids=POOL_IDS)
def test_log_step_pools_match_their_references(pool, reference, module, size):
    # Integer-valued floats: many ties, where a wrong shift would show.
    x = torch.randint(-4, 5, (2, 3, *size)).float()
    torch.testing.assert_close(pool(x, method="log_step"), reference(x), rtol=0, atol=0)
    torch.testing.assert_close(pool(x, method="cummax"), reference(x), rtol=0, atol=0)
    vertical, horizontal = torch.randn(2, 3, *size), torch.randn(2, 3, *size)
    torch.testing.assert_close(
        center_pool(vertical, horizontal, method="log_step"),
        corner_pool_module.center_pool_reference(vertical, horizontal),
        rtol=0,
        atol=0,
    )


def test_unknown_pool_method_is_named():
    with pytest.raises(ValueError, match="'fast'"):
        top_pool(torch.randn(1, 1, 2, 2), method="fast")


class _AllPools(nn.Module):
    def forward(self, x):
        return top_pool(x) + bottom_pool(x) * 2 + left_pool(x) * 3 + right_pool(x) * 4 + (
            center_pool(x, -x)
        )


def _pooled_reference(x):
    m = corner_pool_module
    return (
        m.top_pool_reference(x) + m.bottom_pool_reference(x) * 2 + m.left_pool_reference(x) * 3
        + m.right_pool_reference(x) * 4 + m.center_pool_reference(x, -x)
    )


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_pools_export_without_cummax(dynamic):
    """torch.export traces the log-step form (no cummax in the graph); the program matches
    the slow references, with a symbolic side at sizes other than the traced one."""
    from torch.export import Dim

    x = torch.randn(2, 3, 8, 12)
    shapes = {"x": {2: Dim("height", min=2, max=64), 3: Dim("width", min=2, max=64)}}
    program = torch.export.export(_AllPools(), (x,), dynamic_shapes=shapes if dynamic else None)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("cummax" in target for target in targets)
    for size in [(8, 12)] + ([(5, 33), (64, 2)] if dynamic else []):
        images = torch.randn(2, 3, *size)
        torch.testing.assert_close(
            program.module()(images), _pooled_reference(images), rtol=0, atol=0
        )


def test_pools_onnx_matches_onnxruntime():
    """The ONNX exporter (through torch.export) picks the log-step form by itself."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    x = torch.randn(1, 2, 7, 9)
    program = torch.onnx.export(
        _AllPools().eval(), (x,), dynamo=True, opset_version=19, verbose=False
    )
    session = onnxruntime.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    [actual] = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(actual), _pooled_reference(x), rtol=0, atol=0)


@pytest.mark.gpu
def test_deform_conv_on_cuda_matches_cpu():
    case = _random_case(dtype=torch.float32, groups=2)
    expected = modulated_deform_conv2d(**case, padding=1)
    actual = modulated_deform_conv2d(**{k: v.cuda() for k, v in case.items()}, padding=1)
    torch.testing.assert_close(actual.cpu(), expected, rtol=1e-4, atol=1e-4)
    module = ModulatedDeformConv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        module.conv_offset_mask.weight.normal_(std=0.3)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(module.cuda()(x.cuda()).cpu(), module.cpu()(x), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("pool", ALL_POOLS, ids=ALL_POOL_IDS)
def test_pools_on_cuda_match_cpu(pool):
    x = torch.randn(2, 3, 9, 11, requires_grad=True)
    x_cuda = x.detach().cuda().requires_grad_()
    torch.testing.assert_close(pool(x_cuda).cpu(), pool(x), rtol=0, atol=0)
    pool(x).sum().backward()
    pool(x_cuda).sum().backward()
    torch.testing.assert_close(x_cuda.grad.cpu(), x.grad, rtol=0, atol=0)
