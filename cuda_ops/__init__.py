"""Custom operators for CenterNet variants (modulated deformable convolution, corner and center
pooling, soft-NMS). Each comes as a function plus a thin module, with a slow reference
implementation that runs on CPU as its test oracle. Importing this package never fails and
never compiles anything.

The operators arrive with the DCN/DLA work; the package exists now so the layering
`cuda_ops` <- `detector` <- `ctprune` is fixed and tested from the start.
"""

__all__: list[str] = []
