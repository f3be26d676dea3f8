"""Any single-input MONAI segmentation bundle, run unchanged on one CT or MR series."""
