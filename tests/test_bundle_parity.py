"""Our model path gives the same BraTS labels as MONAI's own bundle inference.

A SegResNet with the MONAI ``brats_mri_segmentation`` bundle's architecture and
random weights (fixed seed) is saved as a bundle directory whose
``configs/inference.json`` and ``configs/metadata.json`` follow the real bundle
(Project-MONAI/model-zoo ``models/brats_mri_segmentation/configs``, bundle
0.4.x), with a small roi so the test runs in seconds. The same preprocessed
tensor then goes through

* MONAI's bundle machinery: ``ConfigWorkflow`` parses the bundle; its
  ``network``, ``inferer`` and ``postprocessing`` (``Activationsd`` sigmoid,
  ``Invertd``, ``AsDiscreted`` threshold, the ``Lambdad`` label map) run as the
  bundle's ``SupervisedEvaluator`` runs them (the evaluator itself needs
  pytorch-ignite, and ``SaveImaged`` only writes the result to a file);
* ours: :func:`models.bundle_import.import_monai_bundle` -> registry (SHA-256,
  strict load) -> :class:`pipelines.brain_tumour.model.BrainTumourModel`,
  which takes the node's ``(C, D, H, W)`` layout and transposes it to the
  bundle's ``(C, X, Y, Z)``.

The label maps must be identical, voxel for voxel.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

pytest.importorskip("monai")

from monai.bundle import ConfigWorkflow  # noqa: E402
from monai.data import MetaTensor  # noqa: E402
from monai.networks.nets import SegResNet  # noqa: E402

from models.bundle_import import import_monai_bundle  # noqa: E402
from models.registry import ModelRegistry  # noqa: E402
from models.segresnet import BUNDLE_PARAMS  # noqa: E402
from pipelines.brain_tumour.model import BrainTumourModel  # noqa: E402

ROI = [32, 24, 16]  # the real bundle: [240, 240, 160]; unequal sides catch a roi given in the wrong axis order
SHAPE_XYZ = (48, 40, 32)  # several overlapping windows per axis

# configs/inference.json of the real bundle, roi aside.
INFERENCE = {
    "imports": ["$import glob", "$import os"],
    "bundle_root": ".",
    "ckpt_dir": "$@bundle_root + '/models'",
    "output_dir": "$@bundle_root + '/eval'",
    "data_list_file_path": "$@bundle_root + '/configs/datalist.json'",
    "dataset_dir": "/workspace/data/medical/brats2018challenge",
    "test_datalist": "$monai.data.load_decathlon_datalist(@data_list_file_path, data_list_key='testing', "
                     "base_dir=@dataset_dir)",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "amp": True,
    "network_def": {"_target_": "SegResNet", **BUNDLE_PARAMS},
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image", "image_only": False},
        {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True},
    ]},
    "dataset": {"_target_": "Dataset", "data": "@test_datalist", "transform": "@preprocessing"},
    "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": True,
                   "num_workers": 4},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": ROI, "sw_batch_size": 1, "overlap": 0.5},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "meta_keys": "pred_meta_dict", "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
        {"_target_": "Lambdad", "keys": "pred",
         "func": "$lambda x: torch.where(x[[2]] > 0, 4, torch.where(x[[0]] > 0, 1, torch.where(x[[1]] > 0, 2, 0)))"},
        {"_target_": "SaveImaged", "keys": "pred", "meta_keys": "pred_meta_dict", "output_dir": "@output_dir",
         "output_postfix": "seg", "output_dtype": "uint8", "resample": False, "squeeze_end_dims": True},
    ]},
    "handlers": [
        {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
         "load_dict": {"model": "@network"}},
        {"_target_": "StatsHandler", "iteration_log": False},
    ],
    "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                  "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                  "val_handlers": "@handlers", "amp": True},
    "initialize": ["$setattr(torch.backends.cudnn, 'benchmark', True)"],
    "run": ["$@evaluator.run()"],
}

METADATA = {
    "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
    "version": "0.4.2",
    "monai_version": "1.2.0rc4",
    "name": "BraTS MRI segmentation",
    "task": "Multimodal Brain Tumor segmentation",
    "eval_metrics": {"val_mean_dice": 0.8518, "val_mean_dice_tc": 0.8559, "val_mean_dice_wt": 0.9026,
                     "val_mean_dice_et": 0.7905},
    "intended_use": "This is an example, not to be used for diagnostic purposes",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "MR", "num_channels": 4,
                             "spatial_shape": ["8*n", "8*n", "8*n"], "dtype": "float32", "is_patch_data": True,
                             "channel_def": {"0": "T1c", "1": "T1", "2": "T2", "3": "FLAIR"}}},
        "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 3,
                             "spatial_shape": ["8*n", "8*n", "8*n"], "dtype": "float32", "value_range": [0, 1],
                             "is_patch_data": True,
                             "channel_def": {"0": "Tumor core", "1": "Whole tumor", "2": "Enhancing tumor"}}},
    },
}


def raw_volume(seed: int = 7) -> np.ndarray:
    """``(4, X, Y, Z)`` intensities: smooth random 'tissue' inside an ellipsoid, 0 outside (skull-stripped)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 4, 6, 5, 4, generator=g)
    vol = torch.nn.functional.interpolate(coarse, size=SHAPE_XYZ, mode="trilinear", align_corners=False)[0]
    vol = vol * 800 + 200 + torch.rand(4, *SHAPE_XYZ, generator=g) * 50
    axes = [torch.linspace(-1, 1, n) for n in SHAPE_XYZ]
    xx, yy, zz = torch.meshgrid(*axes, indexing="ij")
    brain = (xx / 0.85) ** 2 + (yy / 0.8) ** 2 + (zz / 0.9) ** 2 <= 1.0
    return (vol * brain).numpy().astype(np.float32)


def write_bundle(root, net: torch.nn.Module, inference: dict = INFERENCE):
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps(inference, indent=4))
    (root / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=4))
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


def random_bundle_net(x_net: torch.Tensor) -> SegResNet:
    """The bundle's SegResNet with seeded random weights, the final bias set so that each channel is on in
    about half of the voxels of ``x_net``: otherwise random logits can put one label everywhere."""
    from monai.inferers import sliding_window_inference

    torch.manual_seed(20250101)
    net = SegResNet(**BUNDLE_PARAMS).eval()
    final = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    with torch.no_grad():
        logits = sliding_window_inference(x_net[None], ROI, 1, net, overlap=0.5)[0]
        final.bias.sub_(logits.flatten(1).median(dim=1).values)
    return net


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """The bundle directory, MONAI's labels for it, the preprocessed image, and our model on an imported card."""
    from monai.transforms import NormalizeIntensity

    root = tmp_path_factory.mktemp("parity")
    raw = raw_volume()
    x_net = torch.as_tensor(NormalizeIntensity(nonzero=True, channel_wise=True)(raw), dtype=torch.float32)
    bundle = write_bundle(root / "brats_mri_segmentation", random_bundle_net(x_net))
    expected, image_net = bundle_labels(bundle, raw)
    card_path = import_monai_bundle(bundle, root / "cards", name="brats-bundle-parity")
    model = BrainTumourModel(ModelRegistry([root / "cards"], include_shipped=False), "brats-bundle-parity")
    return {"bundle": bundle, "expected": expected, "image_net": image_net, "card_path": card_path, "model": model}


def bundle_labels(bundle, raw: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """MONAI's own inference from the bundle's config: ``(X, Y, Z)`` labels and the preprocessed image."""
    wf = ConfigWorkflow(config_file=str(bundle / "configs" / "inference.json"),
                        meta_file=str(bundle / "configs" / "metadata.json"), workflow_type="infer",
                        logging_file=False, bundle_root=str(bundle))
    wf.initialize()
    parser = wf.parser
    network = parser.get_parsed_content("network")
    # the bundle's CheckpointLoader handler: {"model": @network} from models/model.pt, strict
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True), strict=True)
    network.eval()
    preprocessing = parser.get_parsed_content("preprocessing")
    normalise = [t for t in preprocessing.transforms if type(t).__name__ == "NormalizeIntensityd"]
    assert len(normalise) == 1
    # what LoadImaged gives for a (C, X, Y, Z) image with channel_def T1c, T1, T2, FLAIR
    data = normalise[0]({"image": MetaTensor(torch.from_numpy(raw.copy()))})
    inferer = parser.get_parsed_content("inferer")
    with torch.no_grad():  # SupervisedEvaluator._iteration: engine.inferer(inputs, engine.network)
        pred = inferer(data["image"][None].to(parser.get_parsed_content("device")), network)[0]
    data["pred"] = pred
    post = parser.get_parsed_content("postprocessing")
    names = [type(t).__name__ for t in post.transforms]
    assert names == ["Activationsd", "Invertd", "AsDiscreted", "Lambdad", "SaveImaged"]
    for t in post.transforms[:-1]:  # SaveImaged only writes the file
        data = t(data)
    labels = data["pred"]
    assert labels.shape[0] == 1
    return np.asarray(labels[0].cpu()).astype(np.uint8), data["image"].as_tensor()


def test_pipeline_labels_equal_monai_bundle_inference(parity):
    expected, image_net, model = parity["expected"], parity["image_net"], parity["model"]
    assert expected.shape == SHAPE_XYZ
    assert set(np.unique(expected).tolist()) == {0, 1, 2, 4}, "the random net must exercise every label"
    card = json.loads(parity["card_path"].read_text())
    assert card["segmentation"]["sliding_window"]["roi_size"] == ROI
    assert card["architecture"] == {"name": "SegResNet", "params": BUNDLE_PARAMS}

    # the node's (C, D, H, W) = (C, Z, Y, X) layout of the same preprocessed tensor
    x_dhw = image_net.permute(0, 3, 2, 1).contiguous().numpy()
    pred = model.predict(x_dhw)
    ours = pred.labels.transpose(2, 1, 0)
    assert pred.labels.dtype == np.uint8 and pred.labels.shape == x_dhw.shape[1:]
    mismatch = int((ours != expected).sum())
    assert mismatch == 0, f"{mismatch} of {expected.size} voxels differ from MONAI's bundle inference"


def test_parity_is_sensitive_to_the_axis_layout(parity):
    """The bundle's (C, X, Y, Z) tensor handed over as if it were the node's (C, D, H, W) is transposed once
    too often and gives other labels: the parity above checks the layout, not only the label map."""
    expected, image_net, model = parity["expected"], parity["image_net"], parity["model"]
    wrong = model.predict(image_net.numpy().copy())
    assert wrong.labels.shape == expected.shape
    assert (wrong.labels != expected).mean() > 0.05


def test_import_refuses_a_bundle_with_another_label_map(tmp_path):
    other = copy.deepcopy(INFERENCE)
    # TC before ET: an enhancing voxel inside the core would be labelled 1, not 4
    other["postprocessing"]["transforms"][3]["func"] = (
        "$lambda x: torch.where(x[[0]] > 0, 1, torch.where(x[[2]] > 0, 4, torch.where(x[[1]] > 0, 2, 0)))")
    net = SegResNet(**BUNDLE_PARAMS)
    changed = write_bundle(tmp_path / "b", net, other)
    with pytest.raises(ValueError, match="Lambdad"):
        import_monai_bundle(changed, tmp_path / "cards")
    assert not (tmp_path / "cards" / "brats-mri-segmentation.json").exists()
