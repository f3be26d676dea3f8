"""Network layout, op_norm, model cards, registry, and the torchxrayvision import."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from models.card import ModelCard
from models.densenet import LUNG_OPACITY_INDEX, PNEUMONIA_INDEX, XRV_LABELS, XRVDenseNet121, op_norm
from models.registry import ModelNotFoundError, ModelRegistry, WeightsIntegrityError, sha256_file

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "models" / "templates" / "xrv-densenet121-res224-rsna.json"

# A stand-alone DenseNet in torchxrayvision's own layout (torchvision module
# names, ``features`` -> relu -> avg pool -> ``classifier``, ``op_threshs``
# buffer), written after torchxrayvision/models.py. It is the reference our
# MONAI-based network must match, and the "torchxrayvision" package that the
# import test pickles from.
REFERENCE_SOURCE = textwrap.dedent(
    '''
    from collections import OrderedDict
    import torch
    import torch.nn as nn
    import torch.nn.functional as F


    class _DenseLayer(nn.Sequential):
        def __init__(self, num_input_features, growth_rate, bn_size, drop_rate):
            super().__init__()
            self.add_module("norm1", nn.BatchNorm2d(num_input_features))
            self.add_module("relu1", nn.ReLU(inplace=True))
            self.add_module("conv1", nn.Conv2d(num_input_features, bn_size * growth_rate, 1, 1, bias=False))
            self.add_module("norm2", nn.BatchNorm2d(bn_size * growth_rate))
            self.add_module("relu2", nn.ReLU(inplace=True))
            self.add_module("conv2", nn.Conv2d(bn_size * growth_rate, growth_rate, 3, 1, 1, bias=False))
            self.drop_rate = drop_rate

        def forward(self, x):
            return torch.cat([x, super().forward(x)], 1)


    class _DenseBlock(nn.Sequential):
        def __init__(self, num_layers, num_input_features, bn_size, growth_rate, drop_rate):
            super().__init__()
            for i in range(num_layers):
                self.add_module("denselayer%d" % (i + 1),
                                _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate))


    class _Transition(nn.Sequential):
        def __init__(self, num_input_features, num_output_features):
            super().__init__()
            self.add_module("norm", nn.BatchNorm2d(num_input_features))
            self.add_module("relu", nn.ReLU(inplace=True))
            self.add_module("conv", nn.Conv2d(num_input_features, num_output_features, 1, 1, bias=False))
            self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))


    class DenseNet(nn.Module):
        def __init__(self, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, bn_size=4,
                     drop_rate=0, num_classes=18, in_channels=1, op_threshs=None, buffer=True):
            super().__init__()
            self.features = nn.Sequential(OrderedDict([
                ("conv0", nn.Conv2d(in_channels, num_init_features, 7, 2, 3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]))
            n = num_init_features
            for i, num_layers in enumerate(block_config):
                self.features.add_module("denseblock%d" % (i + 1),
                                         _DenseBlock(num_layers, n, bn_size, growth_rate, drop_rate))
                n = n + num_layers * growth_rate
                if i != len(block_config) - 1:
                    self.features.add_module("transition%d" % (i + 1), _Transition(n, n // 2))
                    n = n // 2
            self.features.add_module("norm5", nn.BatchNorm2d(n))
            self.classifier = nn.Linear(n, num_classes)
            if buffer:
                self.register_buffer("op_threshs", op_threshs)
            else:  # older torchxrayvision kept it as a plain attribute
                self.op_threshs = op_threshs

        def forward(self, x):
            features = self.features(x)
            out = F.relu(features, inplace=True)
            out = F.adaptive_avg_pool2d(out, (1, 1)).view(features.size(0), -1)
            return self.classifier(out)


    def randomise(model, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, t in model.state_dict().items():
                if t.is_floating_point() and name != "op_threshs":
                    t.copy_(torch.rand(t.shape, generator=g) * (0.2 if "running_var" not in name else 1.0)
                            + (0.5 if "running_var" in name else -0.1))
        return model
    '''
)

RSNA_THRESHS = [math.nan] * 18
RSNA_THRESHS[PNEUMONIA_INDEX] = 0.13486601
RSNA_THRESHS[LUNG_OPACITY_INDEX] = 0.13511065


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "xrv_reference_models.py"
    path.write_text(REFERENCE_SOURCE)
    spec = importlib.util.spec_from_file_location("xrv_reference_models", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def reference_model(reference):
    torch.manual_seed(0)
    m = reference.DenseNet(op_threshs=torch.tensor(RSNA_THRESHS))
    return reference.randomise(m, 1).eval()


# --------------------------------------------------------------------------- network


def test_state_dict_uses_torchvision_names(reference_model):
    ours = list(XRVDenseNet121().state_dict())
    theirs = list(reference_model.state_dict())
    assert sorted(ours) == sorted(theirs)
    assert len(ours) == 728  # 727 DenseNet-121 entries + op_threshs
    for key in ("features.conv0.weight", "features.denseblock4.denselayer16.conv2.weight",
                "features.transition3.norm.running_var", "features.norm5.bias", "classifier.weight", "op_threshs"):
        assert key in ours
    assert not [k for k in ours if ".layers." in k or k.startswith("class_layers")]


def test_loads_torchxrayvision_layout_strictly_and_computes_the_same(reference_model):
    ours = XRVDenseNet121().eval()
    ours.load_state_dict(reference_model.state_dict(), strict=True)
    assert torch.equal(ours.class_layers.out.weight, reference_model.classifier.weight)
    x = torch.rand(2, 1, 96, 96) * 2048 - 1024
    with torch.no_grad():
        assert torch.allclose(ours(x), reference_model(x), rtol=1e-4, atol=1e-3)
    assert torch.equal(torch.isnan(ours.op_threshs), torch.isnan(torch.tensor(RSNA_THRESHS)))
    # and what we save loads back into torchxrayvision's layout, strictly
    reference_model.load_state_dict(ours.state_dict(), strict=True)


def test_strict_loading_refuses_monai_names_and_missing_keys(reference_model):
    sd = dict(reference_model.state_dict())
    sd["class_layers.out.weight"] = sd.pop("classifier.weight")
    with pytest.raises(RuntimeError, match="classifier.weight"):
        XRVDenseNet121().load_state_dict(sd, strict=True)
    sd = dict(reference_model.state_dict())
    del sd["op_threshs"]
    with pytest.raises(RuntimeError, match="op_threshs"):
        XRVDenseNet121().load_state_dict(sd, strict=True)


def test_network_rejects_bad_arguments():
    with pytest.raises(ValueError, match="op_threshs"):
        XRVDenseNet121(op_threshs=[0.5] * 3)
    with pytest.raises(ValueError, match="in_channels"):
        XRVDenseNet121(in_channels=0)


def test_labels_are_torchxrayvision_default_order():
    assert len(XRV_LABELS) == 18
    assert XRV_LABELS[8] == "Pneumonia" and XRV_LABELS[16] == "Lung Opacity"
    assert XRV_LABELS[0] == "Atelectasis" and XRV_LABELS[17] == "Enlarged Cardiomediastinum"


# --------------------------------------------------------------------------- op_norm


def test_op_norm_maps_operating_points_to_one_half():
    t = torch.tensor(RSNA_THRESHS)
    p = torch.full((1, 18), 0.3)
    p[0, PNEUMONIA_INDEX] = 0.13486601
    p[0, LUNG_OPACITY_INDEX] = 0.13511065
    out = op_norm(p, t)
    assert out[0, PNEUMONIA_INDEX].item() == pytest.approx(0.5, abs=1e-6)
    assert out[0, LUNG_OPACITY_INDEX].item() == pytest.approx(0.5, abs=1e-6)
    # labels without an operating point read 0.5, as in torchxrayvision
    assert out[0, 0].item() == 0.5


@pytest.mark.parametrize("p", [0.0, 0.05, 0.13, 0.2, 0.6, 0.99, 1.0])
def test_op_norm_values_follow_torchxrayvision(p):
    t = 0.13486601
    expected = p / (2 * t) if p < t else 1 - (1 - p) / (2 * (1 - t))
    probs = torch.full((1, 18), p)
    out = op_norm(probs, torch.tensor(RSNA_THRESHS))
    assert out[0, PNEUMONIA_INDEX].item() == pytest.approx(expected, abs=1e-6)
    assert 0.0 <= out[0, PNEUMONIA_INDEX].item() <= 1.0


def test_op_norm_is_monotonic_and_checks_shapes():
    p = torch.linspace(0, 1, 101)[:, None].repeat(1, 18)
    out = op_norm(p, torch.tensor(RSNA_THRESHS))[:, PNEUMONIA_INDEX]
    assert torch.all(out[1:] >= out[:-1])
    with pytest.raises(ValueError):
        op_norm(torch.zeros(2, 17), torch.tensor(RSNA_THRESHS))


# --------------------------------------------------------------------------- cards


def _card_dict(weights_path: str = "w.pt", sha: str = "0" * 64) -> dict:
    data = json.loads(TEMPLATE.read_text())
    data["name"] = "test-model"
    data["weights"] = {"format": "state_dict", "path": weights_path, "sha256": sha}
    return data


def test_template_is_a_valid_card_once_filled():
    card = ModelCard(**_card_dict())
    assert card.output.target_index == PNEUMONIA_INDEX
    assert card.input.size == (224, 224) and card.output.op_norm
    assert card.licence.spdx == "Apache-2.0"


@pytest.mark.parametrize(
    ("change", "attribute"),
    [
        (lambda d: d["weights"].update(sha256="abc"), "weights.sha256"),
        (lambda d: d.update(colour="red"), "colour"),
        (lambda d: d["weights"].update(format="onnx"), "weights.format"),
        (lambda d: d["output"].update(target="Cardiomegaly"), "output"),
        (lambda d: d.update(task="detection"), "task"),
        (lambda d: d.pop("demonstration_only"), "demonstration_only"),
        (lambda d: d["input"].update(size=[4, 224]), "input.size"),
        (
            lambda d: d.update(metrics=[{"name": "AUROC", "value": 0.9, "ci95_low": 0.91, "ci95_high": 0.95,
                                         "dataset": "x", "split": "test", "n": 10}]),
            "metrics",
        ),
    ],
)
def test_invalid_card_raises_value_error_naming_the_attribute(change, attribute):
    data = _card_dict()
    change(data)
    with pytest.raises(ValueError, match=attribute.replace(".", r"\.")):
        ModelCard(**data)


# --------------------------------------------------------------------------- registry


@pytest.fixture()
def card_dir(tmp_path, reference_model):
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in reference_model.state_dict().items()}
    torch.save(sd, tmp_path / "w.pt")
    data = _card_dict("w.pt", sha256_file(tmp_path / "w.pt"))
    (tmp_path / "test-model.json").write_text(json.dumps(data))
    return tmp_path


def test_registry_loads_float16_state_dict_as_float32_eval(card_dir, reference_model):
    reg = ModelRegistry([card_dir], include_shipped=False)
    assert reg.names() == ["test-model"]
    model = reg.load("test-model", "cpu")
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    expected = reference_model.state_dict()["classifier.weight"].half().float()
    assert torch.equal(model.state_dict()["classifier.weight"], expected)


def test_registry_refuses_sha256_mismatch(card_dir):
    with open(card_dir / "w.pt", "ab") as f:
        f.write(b"tampered")
    reg = ModelRegistry([card_dir], include_shipped=False)
    with pytest.raises(WeightsIntegrityError) as info:
        reg.load("test-model")
    msg = str(info.value)
    assert str(card_dir / "w.pt") in msg
    assert sha256_file(card_dir / "w.pt") in msg
    assert reg.card("test-model").weights.sha256 in msg


def test_registry_missing_weights_and_unknown_name(card_dir):
    (card_dir / "w.pt").unlink()
    reg = ModelRegistry([card_dir], include_shipped=False)
    with pytest.raises(FileNotFoundError, match="w.pt"):
        reg.load("test-model")
    with pytest.raises(ModelNotFoundError, match="test-model"):
        reg.card("nope")


def test_registry_refuses_duplicate_names_and_missing_dirs(card_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    (other / "again.json").write_text((card_dir / "test-model.json").read_text())
    with pytest.raises(ValueError, match="defined twice"):
        ModelRegistry([card_dir, other], include_shipped=False)
    with pytest.raises(ValueError, match="card_dirs"):
        ModelRegistry([card_dir / "absent"], include_shipped=False)


def test_registry_refuses_weights_of_another_architecture(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "w.pt")
    (tmp_path / "test-model.json").write_text(json.dumps(_card_dict("w.pt", sha256_file(tmp_path / "w.pt"))))
    with pytest.raises(ValueError, match="does not fit"):
        ModelRegistry([tmp_path], include_shipped=False).load("test-model")


def test_registry_loads_torchscript(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU()).eval()
    torch.jit.save(torch.jit.script(net), tmp_path / "w.ts")
    data = _card_dict("w.ts", sha256_file(tmp_path / "w.ts"))
    data["weights"]["format"] = "torchscript"
    (tmp_path / "test-model.json").write_text(json.dumps(data))
    model = ModelRegistry([tmp_path], include_shipped=False).load("test-model")
    x = torch.rand(1, 1, 8, 8)
    assert torch.allclose(model(x), net(x))


def test_registry_loads_monai_bundle(tmp_path):
    from monai.networks.nets import BasicUNet

    bundle = tmp_path / "tiny_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    cfg = {"network_def": {"_target_": "BasicUNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
                           "features": [4, 4, 8, 8, 16, 4]}}
    (bundle / "configs" / "inference.json").write_text(json.dumps(cfg))
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"version": "0.0.1"}))
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4)).eval()
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    data = _card_dict("tiny_bundle", sha256_file(bundle / "models" / "model.pt"))
    data["weights"]["format"] = "monai_bundle"
    (tmp_path / "test-model.json").write_text(json.dumps(data))
    model = ModelRegistry([tmp_path], include_shipped=False).load("test-model")
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), net(x), atol=1e-6)


# --------------------------------------------------------------------------- torchxrayvision import

_MAKE_PICKLES = textwrap.dedent(
    """
    import math, sys, torch
    out = sys.argv[1]
    from torchxrayvision import models
    assert models.__name__ == "torchxrayvision.models"
    thr = [math.nan] * 18; thr[8] = 0.13486601; thr[16] = 0.13511065
    torch.manual_seed(3)
    m = models.randomise(models.DenseNet(op_threshs=torch.tensor(thr)), 5)
    torch.save(m.state_dict(), out + "/original_state_dict.pt")
    torch.save(m, out + "/whole_zip.pt")
    torch.save(m, out + "/whole_legacy.pt", _use_new_zipfile_serialization=False)
    old = models.randomise(models.DenseNet(op_threshs=None, buffer=False), 5)
    torch.save(old, out + "/whole_no_buffer.pt")
    """
)

_IMPORT = textwrap.dedent(
    """
    import importlib.util, pickle, sys
    assert importlib.util.find_spec("torchxrayvision") is None, "torchxrayvision must not be importable here"
    assert importlib.util.find_spec("torchvision") is None
    from pathlib import Path
    from models.xrv_import import import_xrv_weights, read_pickled_xrv_model
    d = Path(sys.argv[1])
    for stem in ("whole_zip", "whole_legacy", "whole_no_buffer"):
        print(import_xrv_weights(d / (stem + ".pt"), d / ("cards_" + stem), name="xrv-" + stem.replace("_", "-")))
    try:
        read_pickled_xrv_model(d / "evil.pt")
    except pickle.UnpicklingError as exc:
        print("REFUSED", exc)
    assert "torchxrayvision" not in sys.modules
    """
)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_import_xrv_weights_without_torchxrayvision(tmp_path):
    pkg_root = tmp_path / "fakepkgs"
    (pkg_root / "torchxrayvision").mkdir(parents=True)
    (pkg_root / "torchxrayvision" / "__init__.py").write_text("from . import models\n")
    (pkg_root / "torchxrayvision" / "models.py").write_text(REFERENCE_SOURCE)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{pkg_root}{os.pathsep}{REPO}"}
    subprocess.run([sys.executable, "-c", _MAKE_PICKLES, str(work)], check=True, env=env, cwd=tmp_path,
                   timeout=120)
    torch.save({"model": _Evil()}, work / "evil.pt")

    # the importing process has the repository but not the fake package on its path
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _IMPORT, str(work)], env=env, cwd=tmp_path, timeout=180,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "REFUSED" in done.stdout and "system" in done.stdout
    assert "pwned" not in done.stdout

    original = torch.load(work / "original_state_dict.pt", weights_only=True)
    for stem in ("whole_zip", "whole_legacy", "whole_no_buffer"):
        name = "xrv-" + stem.replace("_", "-")
        reg = ModelRegistry([work / f"cards_{stem}"], include_shipped=False)
        card = reg.card(name)
        assert card.licence.spdx == "Apache-2.0" and card.output.op_norm
        assert card.weights.sha256 == sha256_file(reg.weights_path(name))
        imported = torch.load(reg.weights_path(name), weights_only=True)
        assert list(imported) == list(original)
        for key, value in original.items():
            if key == "op_threshs":
                assert torch.allclose(imported[key], value, equal_nan=True)
            else:
                assert torch.equal(imported[key], value), key
        model = reg.load(name)  # strict=True inside, SHA-256 checked
        assert model.op_threshs[PNEUMONIA_INDEX].item() == pytest.approx(0.13486601)
    # the pickled model without a buffer got torchxrayvision's RSNA thresholds
    notes = ModelRegistry([work / "cards_whole_no_buffer"], include_shipped=False).card(
        "xrv-whole-no-buffer").training.notes
    assert "model_urls" in notes


def test_restricted_unpickler_refuses_unknown_globals(tmp_path):
    from models.xrv_import import read_pickled_xrv_model

    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match="system"):
        read_pickled_xrv_model(tmp_path / "evil.pt")
