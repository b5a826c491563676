"""Benchmarking: interleaving order, the statistics, the default torch path's outputs, peak
memory against a hand count, and `ctprune bench` on tiny pruned and unpruned checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tiny_config, tiny_model
from torch import nn

from ctprune.bench import (
    _torch_path,
    bench_models,
    deploy_torch,
    interleaved_times,
    paired_speedup,
    percentile,
    torch_peak_mib,
    torch_threads,
)
from ctprune.cli import main
from ctprune.pruning import prune
from detector import build_model, count_macs, save_checkpoint
from detector.export import fuse_heads
from detector.models.centernet import FusedHeads
from detector.stats import MIB


def test_interleaving_alternates_order_after_warmup() -> None:
    calls = []
    runners = {name: (lambda images, name=name: calls.append(name)) for name in "abc"}
    times = interleaved_times(runners, torch.zeros(1), rounds=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("cba") + list("abc")
    assert {name: len(seconds) for name, seconds in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_statistics() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    for fraction in (0.0, 0.5, 0.9, 1.0):
        assert percentile(values, fraction) == pytest.approx(np.percentile(values, fraction * 100))
    # per-round ratios 2, 3, 0.5: median 2
    assert paired_speedup([2.0, 6.0, 1.0], [1.0, 2.0, 2.0]) == (2.0, 0.5, 3.0)


def test_default_path_keeps_outputs() -> None:
    model = tiny_model().eval()
    images = torch.randn(2, 3, 64, 64)
    deployed = deploy_torch(model)
    with torch.inference_mode():
        expected = model(images)[-1]
        actual = deployed(images.contiguous(memory_format=torch.channels_last))[-1]
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=1e-4, rtol=1e-4)


def test_fused_heads_keep_the_outputs_of_a_model_pruned_per_head() -> None:
    model = tiny_model().eval()
    # Global pruning leaves the three heads different widths; the fused conv keeps them.
    pruned = prune(model, 0.5, "l1", scope="global", round_to=None).model.eval()
    widths = [head[0].out_channels for head in pruned.heads.values()]
    fused = fuse_heads(pruned)
    assert isinstance(fused.heads, FusedHeads) and fused.heads.splits == widths
    assert not isinstance(pruned.heads, FusedHeads)  # a copy: the model keeps its heads
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, actual = pruned(images)[0], fused(images)[0]
    assert list(actual) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=1e-5, rtol=1e-5)


def test_heads_that_cannot_fuse_are_left_alone() -> None:
    hourglass = tiny_model("hourglass104").eval()  # one set of heads per stack
    assert fuse_heads(hourglass) is hourglass
    no_head_conv = build_model("res18", 3, head_conv=0, widths=tiny_config().widths).eval()
    assert fuse_heads(no_head_conv) is no_head_conv


def test_compiled_path_keeps_outputs_and_falls_back(monkeypatch) -> None:
    model = tiny_model().eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected = model(images)[-1]
    deployed, run = _torch_path(model, torch.device("cpu"), True, images, "tiny")
    assert isinstance(deployed.heads, FusedHeads)
    actual = run(images)[-1]
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=1e-4, rtol=1e-4)

    def broken_compile(module, **options):
        def fail(*args, **kwargs):
            raise RuntimeError("no C++ compiler")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match="tiny: torch.compile failed .*no C\\+\\+ compiler"):
        deployed, run = _torch_path(model, torch.device("cpu"), True, images, "tiny")
    assert not isinstance(deployed.heads, FusedHeads)  # the plain default path
    torch.testing.assert_close(
        run(images)[-1]["heatmap"], expected["heatmap"], atol=1e-4, rtol=1e-4
    )


def test_torch_threads_sets_and_restores_the_count():
    before = torch.get_num_threads()
    with torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(before + 1):
        raise RuntimeError("a failing forward")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


class TwoSteps(nn.Module):
    """x * 2 + 1: the product is alive while the sum is allocated, so the peak is two
    tensors of the input's size (no weights)."""

    def forward(self, images):
        return images * 2 + 1


def test_peak_memory_against_hand_counts() -> None:
    images = torch.randn(1, 3, 32, 32)
    tensor_bytes = 3 * 32 * 32 * 4
    # (+ a few bytes: torch wraps the Python scalars as 0-dim tensors)
    assert torch_peak_mib(TwoSteps(), images) * MIB == pytest.approx(2 * tensor_bytes, abs=64)
    conv = nn.Conv2d(3, 8, 3, padding=1).eval()
    weights, output = (8 * 3 * 3 * 3 + 8) * 4, 8 * 32 * 32 * 4
    # At least the weights and the output; the CPU kernel may add a workspace (im2col).
    assert torch_peak_mib(conv, images) >= (weights + output) / MIB


def test_bench_models_pairs_and_ideal_speedups() -> None:
    spec = tiny_config().input
    model = tiny_model().eval()
    pruned = prune(model, 0.5, "l1", round_to=None).model.eval()
    rows = bench_models(
        {"base": (model, spec), "pruned": (pruned, spec)}, pairs={"pruned": "base"},
        eager=("base",), input_size=64, threads=1, rounds=3, device="cpu", throughput_batch=2,
        compile=False,  # compiled: test_compiled_path_keeps_outputs_and_falls_back
    )
    by_name = {row.name: row for row in rows}
    assert list(by_name) == ["base", "pruned", "base (eager)"]
    assert by_name["pruned"].ideal_speedup == pytest.approx(
        count_macs(model, (64, 64)) / count_macs(pruned, (64, 64))
    )
    assert by_name["base"].pair == "base (eager)" and by_name["base"].ideal_speedup == 1.0
    for row in rows:
        assert 0 < row.latency_ms <= row.latency_p90_ms
        assert row.throughput > 0 and row.peak_mib > 0
        assert row.speedup_min <= row.speedup <= row.speedup_max if row.pair else True
    assert by_name["pruned"].peak_mib < by_name["base"].peak_mib


def test_bench_rejects_bad_arguments() -> None:
    spec = tiny_config().input
    models = {"base": (tiny_model(), spec)}
    with pytest.raises(ValueError, match="multiple of 32"):
        bench_models(models, input_size=50)
    with pytest.raises(ValueError, match="runtime"):
        bench_models(models, runtime="tensorrt")
    with pytest.raises(ValueError, match="not given"):
        bench_models(models, pairs={"base": "other"})


def _unpruned_and_pruned_checkpoints(folder: Path) -> tuple[Path, Path]:
    config = tiny_config()
    model = tiny_model().eval()
    unpruned = save_checkpoint(folder / "base.pt", model, config)
    pruned = prune(model, 0.5, "l1", round_to=None).model
    return unpruned, save_checkpoint(folder / "pruned.pt", pruned, config)


def test_cli_bench_pruned_and_unpruned(tmp_path, capsys) -> None:
    unpruned, pruned = _unpruned_and_pruned_checkpoints(tmp_path)
    arguments = ["bench", str(unpruned), str(pruned), "--input", "64", "--threads", "1",
                 "--rounds", "2", "--device", "cpu", "--no-compile"]
    assert main(arguments) == 0
    table = capsys.readouterr().out
    assert f"{pruned} (unpruned)" in table and f"{unpruned} (eager)" in table
    assert main(["bench", str(tmp_path / "missing.pt")]) == 2


def test_cli_bench_onnxruntime(tmp_path, capsys) -> None:
    """The onnxruntime path exports each model and times it; --no-spin reaches the session."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxslim")
    unpruned, pruned = _unpruned_and_pruned_checkpoints(tmp_path)
    arguments = ["bench", str(unpruned), str(pruned), "--input", "64", "--threads", "1",
                 "--rounds", "2", "--runtime", "onnxruntime", "--no-spin"]
    assert main(arguments) == 0
    table = capsys.readouterr().out
    assert f"{pruned} (unpruned)" in table and "(eager)" not in table  # eager: torch only
    rows = [line for line in table.splitlines() if "| onnxruntime (cpu) |" in line]
    assert len(rows) == 3 and all("(batch 4)" in row for row in rows)  # throughput at batch 4
