"""SegResNet for 3-D brain tumour segmentation, built from a model card's params.

The network is MONAI's ``monai.networks.nets.SegResNet`` (Myronenko, "3D MRI
brain tumor segmentation using autoencoder regularization", BrainLes 2018,
arXiv:1810.11654, without the VAE branch), the network of the MONAI model-zoo
bundle ``brats_mri_segmentation``:
``SegResNet(blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], init_filters=16,
in_channels=4, out_channels=3, dropout_prob=0.2)``. This module only checks the
card's parameters, so a bad card fails with a message naming the attribute
instead of a shape error deep inside the first forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import SegResNet

__all__ = ["BUNDLE_PARAMS", "build_segresnet", "spatial_multiple"]

#: ``network_def`` of the MONAI ``brats_mri_segmentation`` bundle (configs/inference.json).
BUNDLE_PARAMS: dict = {
    "blocks_down": [1, 2, 2, 4],
    "blocks_up": [1, 1, 1],
    "init_filters": 16,
    "in_channels": 4,
    "out_channels": 3,
    "dropout_prob": 0.2,
}


def spatial_multiple(blocks_down: Sequence[int]) -> int:
    """Input sides must be multiples of this: each down stage after the first halves them."""
    return 2 ** (len(blocks_down) - 1)


def build_segresnet(
    *,
    in_channels: int = 4,
    out_channels: int = 3,
    init_filters: int = 16,
    blocks_down: Sequence[int] = (1, 2, 2, 4),
    blocks_up: Sequence[int] = (1, 1, 1),
    dropout_prob: float | None = None,
    num_groups: int = 8,
    spatial_dims: int = 3,
) -> SegResNet:
    """A 3-D MONAI SegResNet with group normalisation (MONAI's default).

    Parameters
    ----------
    in_channels:
        Input channels (MR sequences), >= 1.
    out_channels:
        Output channels (e.g. TC, WT, ET), >= 1.
    init_filters:
        Filters of the first stage; doubled per down stage. A positive multiple
        of ``num_groups``.
    blocks_down, blocks_up:
        Residual blocks per encoder stage and per decoder stage;
        ``len(blocks_up) == len(blocks_down) - 1``.
    dropout_prob:
        Dropout after the initial convolution (the bundle uses 0.2), in [0, 1).
    num_groups:
        GroupNorm groups.
    spatial_dims:
        Must be 3.

    Returns
    -------
    The untrained network; input ``(N, in_channels, X, Y, Z)`` float32 with each
    side a multiple of :func:`spatial_multiple`, output ``(N, out_channels, X, Y, Z)`` logits.

    Raises
    ------
    ValueError
        An invalid parameter; the message names it.
    """
    values = {
        "spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels,
        "num_groups": num_groups, "init_filters": init_filters, "blocks_down": blocks_down,
        "blocks_up": blocks_up, "dropout_prob": dropout_prob,
    }
    checks = {
        "spatial_dims": spatial_dims == 3,
        "in_channels": isinstance(in_channels, int) and in_channels >= 1,
        "out_channels": isinstance(out_channels, int) and out_channels >= 1,
        "num_groups": isinstance(num_groups, int) and num_groups >= 1,
        "init_filters": isinstance(init_filters, int) and init_filters >= 1 and init_filters % max(num_groups, 1) == 0,
        "blocks_down": len(blocks_down) >= 2 and all(isinstance(b, int) and b >= 1 for b in blocks_down),
        "blocks_up": len(blocks_up) == len(blocks_down) - 1 and all(isinstance(b, int) and b >= 1 for b in blocks_up),
        "dropout_prob": dropout_prob is None or 0.0 <= float(dropout_prob) < 1.0,
    }
    for name, ok in checks.items():
        if not ok:
            raise ValueError(f"SegResNet parameter {name} is invalid: {values[name]!r}")
    return SegResNet(
        spatial_dims=3,
        init_filters=init_filters,
        in_channels=in_channels,
        out_channels=out_channels,
        dropout_prob=dropout_prob,
        # ``num_groups=`` alone is ignored by MONAI unless norm_name is set; say it through ``norm``.
        norm=("GROUP", {"num_groups": num_groups}),
        blocks_down=tuple(blocks_down),
        blocks_up=tuple(blocks_up),
    )
