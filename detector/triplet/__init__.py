"""The keypoint-triplet CenterNet (Duan et al., "CenterNet: Keypoint Triplets for Object
Detection"): each object is a top-left corner, a bottom-right corner and a centre keypoint.

- `detector.triplet.targets`: one image's boxes -> the three heatmaps, corner embedding indices,
  sub-cell offsets and the object mask (`encode_triplet_targets`).
- `detector.triplet.loss`: focal loss on the three heatmaps, pull/push associative embedding
  loss, smooth-L1 offsets (`triplet_loss`).
- `detector.triplet.decode`: corner pairing, centre matching, soft-NMS and the flip test
  (`decode_triplet`), and the multi-scale merge (`soft_nms_merge`, `merge_triplet_multiscale`).

Import from the modules; this file imports nothing.
"""
