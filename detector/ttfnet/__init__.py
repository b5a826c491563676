"""The TTFNet head type ("Training-Time-Friendly Network for Real-Time Object Detection", Liu et
al. 2020; github ZJULearning/ttfnet): the ``ttfnet`` entry of the head table
(`detector.heads.HEADS`), usable on every backbone.

- `detector.ttfnet.heads`: `build_ttfnet_heads`, a heatmap branch and a box branch whose output
  ``ltrb`` is the distance from each location to the box's left, top, right and bottom sides.
- `detector.ttfnet.targets`: `encode_ttfnet_targets`, elliptical Gaussian heatmaps and box
  targets over the whole Gaussian area, with their sample weights.
- `detector.ttfnet.loss`: `ttfnet_loss`, the focal heatmap loss plus the weighted GIoU loss.
- `detector.ttfnet.decode`: `decode_ttfnet`, peaks and top-K then boxes from the distances,
  with a flip test; traceable for export.

Import from the modules. This file imports nothing: the head table imports the modules, and the
modules import parts of `detector` that read the head table.
"""
