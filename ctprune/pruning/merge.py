"""K-means channel merging: keep one channel per cluster of similar channels and fold the
others into it.

Per group, each channel is described by what computes it (`channel_features`): the filter of
every producer and the affine map of every BatchNorm on it. The channels are clustered into as
many clusters as channels are kept; the channel nearest each centroid is kept and every other
member of its cluster is folded into it: the consumers' input-channel weights of a removed
channel are added to the kept channel's (`fold_into_kept`), so the consumers still receive
the removed channel's contribution, carried by its look-alike.

Where the fold is exact and where it is not. A consumer computes sum_c W[:, c] * a_c over the
activations a_c it reads. Folding a removed channel r into a kept channel k replaces
W[:, k] a_k + W[:, r] a_r by (W[:, k] + W[:, r]) a_k, which is exact exactly when a_r = a_k
for every input:
- identical channels (every producer's filter and bias, every BatchNorm's affine map and
  running statistics equal): exact, whatever lies between producer and consumer (BN, ReLU,
  residual additions), since the two channels carry the same values everywhere;
- channels that differ: approximate. On a purely linear path (conv -> conv, no BN or ReLU
  between) the error is W[:, r] (a_r - a_k), linear in the filter difference; across
  BatchNorm + ReLU, as in every CenterNet block, it also depends on where the ReLU cuts, and
  a fine-tune is expected after merging (recalibrating BatchNorm statistics does not correct
  it: experiments/bench/prune/report.md).
Layers with grouped or depthwise convolutions in the group are not folded (their channels do
not mix), so their merged channels are simply removed.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import numpy as np
import torch

from .graph import ChannelGroup, input_weight_dim, output_filters

# Features are projected onto their first principal components before clustering: k-means++
# seeding costs width x clusters x features, and ResNet-101's 2048-wide stage has 2568 features
# (its k-means on raw features took most of a 7-minute prune). A linear projection keeps
# identical channels identical, so exact merges stay exact.
MAX_FEATURES = 64
# Groups wider than this are clustered with MiniBatchKMeans. Measured on ResNet-101 after the
# projection, one thread: with as many clusters as 80 % of the channels, MiniBatchKMeans is
# slower than full k-means (0.88 s vs 0.56 s on the 2048-wide stage, 0.36 s vs 0.13 s on the
# 1024-wide one), so only groups wider than any ResNet's use it.
MINIBATCH_ABOVE_WIDTH = 4096
RANDOM_STATE = 0


def _norm_affine(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel scale and shift a BatchNorm applies in eval: y = scale * x + shift."""
    module = layer.module
    channels = layer.channels
    if module.running_var is not None:
        scale = 1 / torch.sqrt(module.running_var[channels] + module.eps)
        shift = -module.running_mean[channels] * scale
    else:
        scale = torch.ones(len(channels), device=channels.device)
        shift = torch.zeros(len(channels), device=channels.device)
    if module.weight is not None:
        scale = scale * module.weight.detach()[channels]
        shift = shift * module.weight.detach()[channels] + module.bias.detach()[channels]
    return scale, shift


def channel_features(group: ChannelGroup) -> torch.Tensor:
    """(width, features) float32 on the CPU: for every channel, each producer's filter (and
    bias) and each BatchNorm's scale and shift. Each layer's block is divided by its root mean
    square row norm, so that no layer dominates the distance by its size or scale."""
    blocks = []
    for layer in group.producers:
        block = output_filters(layer)
        if layer.module.bias is not None:
            block = torch.cat([block, layer.module.bias.detach()[layer.channels, None]], dim=1)
        blocks.append(block)
    for layer in group.norms:
        blocks.append(torch.stack(_norm_affine(layer), dim=1))
    normalised = []
    for block in blocks:
        block = block.detach().float().cpu()
        root_mean_square = block.pow(2).sum(dim=1).mean().sqrt()
        normalised.append(block / root_mean_square.clamp_min(torch.finfo(torch.float32).tiny))
    return torch.cat(normalised, dim=1)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch and scikit-learn (its own OpenMP runtime and BLAS) on one thread each.

    The matrices here are small (at most 2048 x 6448), and on a busy 2-core machine
    multi-threaded LAPACK and two OpenMP runtimes spinning against each other made k-means
    pruning of ResNet-101 take 71 s instead of 5 s (measured); one thread is never slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _thread_pools().limit(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)


@cache
def _thread_pools():
    """The process's native thread pools (a threadpoolctl.ThreadpoolController), found once:
    finding them reads /proc/self/maps, ~4 ms, too slow to repeat for every group. Imported
    here, with scikit-learn, so that importing ctprune does not pay 1.5 s for scikit-learn."""
    import sklearn.cluster  # noqa: F401 (loads scikit-learn's OpenMP runtime, to be found)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def projected_features(group: ChannelGroup) -> torch.Tensor:
    """`channel_features` centred and projected onto their first `MAX_FEATURES` principal
    components (randomised SVD with a fixed seed, so deterministic); unchanged when they have
    no more columns than that."""
    features = channel_features(group)
    if features.shape[1] <= MAX_FEATURES:
        return features
    centred = features - features.mean(dim=0)
    rank = min(MAX_FEATURES, *centred.shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_STATE)
        _, _, components = torch.svd_lowrank(centred, q=rank, niter=2)
    return centred @ components


def merge_distance(group: ChannelGroup) -> torch.Tensor:
    """The k-means criterion's score: how far each channel is from the channels it could be
    merged into, as its edge in the minimum spanning tree of `projected_features` (Prim's
    algorithm, grown from the most isolated channel).

    A spanning tree gives every channel but its root one edge, and the number of channels whose
    edge is at most ``t`` is exactly the number single-linkage clustering merges at distance
    ``t``: of ``m`` identical channels, ``m - 1`` score 0 and one carries the distance to the
    rest. (Each channel's distance to its nearest neighbour would score all ``m`` zero and, in
    global scope, strip the whole cluster.) The root scores the largest edge. In global scope
    the groups with the most near-duplicates give up the most channels."""
    if group.width < 2:
        return torch.ones(group.width)
    with single_threaded():
        features = projected_features(group)
    distances = torch.cdist(features, features).fill_diagonal_(float("inf"))
    root = int(torch.argmax(distances.min(dim=1).values))
    in_tree = torch.zeros(group.width, dtype=torch.bool)
    in_tree[root] = True
    reach = distances[root].clone()  # each channel's distance to the tree so far
    scores = torch.zeros(group.width)
    for _ in range(group.width - 1):
        candidates = reach.masked_fill(in_tree, float("inf"))
        channel = int(torch.argmin(candidates))
        scores[channel] = candidates[channel]
        in_tree[channel] = True
        reach = torch.minimum(reach, distances[channel])
    scores[root] = scores.max()
    return scores


def kmeans_selection(group: ChannelGroup, keep: int) -> tuple[list[int], dict[int, list[int]]]:
    """Cluster the group's channels (`projected_features`) into ``keep`` clusters and keep the
    channel nearest each centroid. Returns (kept channels ascending, kept channel -> the
    removed channels to fold into it).

    Deterministic (fixed random_state). When k-means leaves fewer distinct clusters than
    ``keep`` (fewer distinct channels than clusters), the channels farthest from their
    cluster's representative are kept on their own until ``keep`` are kept."""
    if keep >= group.width:
        return list(range(group.width)), {}
    from sklearn.cluster import KMeans, MiniBatchKMeans  # see _thread_pools

    method = MiniBatchKMeans if group.width > MINIBATCH_ABOVE_WIDTH else KMeans
    with single_threaded(), warnings.catch_warnings():
        features = projected_features(group).double().numpy()
        # "Number of distinct clusters found smaller than n_clusters": handled below.
        warnings.simplefilter("ignore")
        clustering = method(n_clusters=keep, n_init=1, random_state=RANDOM_STATE).fit(features)
    labels = clustering.labels_
    representative_of = {}
    for cluster in np.unique(labels):
        members = np.flatnonzero(labels == cluster)
        distance = np.linalg.norm(features[members] - clustering.cluster_centers_[cluster], axis=1)
        representative_of[cluster] = int(members[np.argmin(distance)])  # ties: lowest index
    kept = set(representative_of.values())
    if len(kept) < keep:
        distance_to_representative = np.array(
            [
                np.linalg.norm(features[i] - features[representative_of[labels[i]]])
                for i in range(group.width)
            ]
        )
        for channel in np.argsort(-distance_to_representative, kind="stable"):
            if len(kept) == keep:
                break
            kept.add(int(channel))
    merged: dict[int, list[int]] = {}
    for channel in range(group.width):
        if channel not in kept:
            merged.setdefault(representative_of[labels[channel]], []).append(channel)
    return sorted(kept), merged


def _is_grouped(module: torch.nn.Module) -> bool:
    return getattr(module, "groups", 1) > 1


@torch.no_grad()
def fold_into_kept(group: ChannelGroup, merged: dict[int, list[int]]) -> None:
    """Add the removed channels' input-channel weights to their kept channel's, in every
    consumer of the group (transposed convs hold input channels on weight dim 0, convs and
    linear layers on dim 1). Call before the removed channels are pruned."""
    if not merged or any(_is_grouped(layer.module) for layer in group.producers + group.consumers):
        return
    for layer in group.consumers:
        weight = layer.module.weight
        dim = input_weight_dim(layer.module)
        for kept, removed in merged.items():
            sources = layer.channels[removed].to(weight.device)
            target = int(layer.channels[kept])
            weight.narrow(dim, target, 1).add_(
                weight.index_select(dim, sources).sum(dim, keepdim=True)
            )
