"""Static pruning with a trained model: penultimate features over an index, checkpoints, `prune-static --model`."""

import copy
import json

import numpy as np
import pytest
import torch
from imagegen import make_tree
from PIL import Image

from fastprune import cli
from fastprune.data import ImageFolderIndex, default_transform
from fastprune.static.features import extract_features, find_classifier, load_checkpoint_model
from fastprune.train import build_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("feats") / "data"
    make_tree(str(root), per_class=(6, 5, 4))  # 16 images (one nested), 3 classes
    return root


@pytest.fixture(scope="module")
def index(data):
    return ImageFolderIndex(data, cache_dir=False)


def manual_features(model, index, image_size):
    """Each image through the eval transform, one at a time, up to the classifier input (classifier -> Identity)."""
    body = copy.deepcopy(model).eval()
    name, _ = find_classifier(body)
    parent, _, attr = name.rpartition(".")
    setattr(body.get_submodule(parent) if parent else body, attr, torch.nn.Identity())
    tf = default_transform(False, image_size)
    rows = []
    with torch.no_grad():
        for path in index.files:
            with Image.open(path) as im:
                rows.append(body(tf(im.convert("RGB"))[None])[0])
    return torch.stack(rows)


def save_checkpoint(path, model, arch="smallcnn", image_size=32):
    """The parts of `fastprune train`'s checkpoint.pt that feature extraction reads."""
    torch.save({"config": {"arch": arch, "image_size": image_size, "data": "x"}, "epoch": 1,
                "model": model.state_dict()}, path)


class Scaled(torch.nn.Module):
    """A model whose output is not its last linear layer's output."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.body(x)).softmax(dim=1)


@pytest.mark.parametrize("arch", ["smallcnn", "resnet18"])
def test_features_are_the_classifier_input(index, arch):
    torch.manual_seed(0)
    model = build_model(arch, index.num_classes)
    model.train()  # extraction must use eval mode (BatchNorm running statistics) and restore this
    feats = extract_features(index, model, batch_size=5, device="cpu", num_workers=0, image_size=32, progress=False)
    assert model.training
    width = 128 if arch == "smallcnn" else 512
    assert feats.shape == (len(index), width) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    torch.testing.assert_close(feats, manual_features(model, index, 32), rtol=1e-4, atol=1e-5)
    again = extract_features(index, model, batch_size=5, device="cpu", num_workers=0, image_size=32, progress=False)
    assert torch.equal(feats, again)  # deterministic
    other = extract_features(index, model, batch_size=16, device="cpu", num_workers=2, image_size=32, progress=False)
    torch.testing.assert_close(feats, other, rtol=1e-4, atol=1e-5)  # batching and workers do not matter


def test_bf16_autocast_features(index):
    """bf16 autocast (the CUDA default) gives fp32 features close to the fp32 ones, and still checks the layer."""
    torch.manual_seed(0)
    model = build_model("resnet18", index.num_classes)
    kw = dict(batch_size=8, device="cpu", num_workers=0, image_size=32, progress=False)
    exact = extract_features(index, model, bf16=False, **kw)
    fast = extract_features(index, model, bf16=True, **kw)
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    assert not torch.equal(fast, exact)  # autocast really ran
    rel = (fast - exact).norm(dim=1) / exact.norm(dim=1)
    assert rel.max() < 0.05, rel.max()

    with pytest.raises(ValueError, match="is not its final layer"):
        extract_features(index, Scaled(), bf16=True, **kw)


def test_models_without_a_final_linear_layer(index):
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(ValueError, match="has no nn.Linear layer"):
        extract_features(index, conv, device="cpu", num_workers=0, image_size=32, progress=False)

    with pytest.raises(ValueError, match=r"last nn.Linear of Scaled \('fc'\) is not its final layer"):
        extract_features(index, Scaled(), device="cpu", num_workers=0, image_size=32, progress=False)
    feats = extract_features(index, Scaled(), device="cpu", num_workers=0, image_size=32, layer="fc", progress=False)
    assert feats.shape == (len(index), 4)
    with pytest.raises(ValueError, match="model has no module 'nope'"):
        extract_features(index, Scaled(), device="cpu", num_workers=0, image_size=32, layer="nope", progress=False)


def test_checkpoint_loading_and_bad_checkpoints(index, tmp_path):
    torch.manual_seed(1)
    model = build_model("smallcnn", 3)
    save_checkpoint(tmp_path / "checkpoint.pt", model)
    for where in (tmp_path, tmp_path / "checkpoint.pt"):  # the run directory or the file
        net, info = load_checkpoint_model(where, num_classes=3)
        assert info["arch"] == "smallcnn" and info["image_size"] == 32 and info["num_classes"] == 3
        assert info["classifier"] == "head" and not net.training
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), model.state_dict().values()))
    assert load_checkpoint_model(tmp_path)[1]["num_classes"] == 3  # without the dataset: from the weights
    wrapped = {"config": {"arch": "smallcnn"},
               "model": {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}}
    torch.save(wrapped, tmp_path / "wrapped.pt")  # saved from a DDP / torch.compile wrapper
    assert torch.equal(load_checkpoint_model(tmp_path / "wrapped.pt")[0].head.weight, model.head.weight)

    with pytest.raises(FileNotFoundError, match="model checkpoint .*missing.pt' does not exist"):
        load_checkpoint_model(tmp_path / "missing.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no checkpoint.pt"):
        load_checkpoint_model(tmp_path / "empty")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="is not a fastprune checkpoint"):
        load_checkpoint_model(tmp_path / "notes.pt")
    torch.save({"weights": [1, 2]}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a fastprune checkpoint"):
        load_checkpoint_model(tmp_path / "other.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="is not a fastprune checkpoint"):
        load_checkpoint_model(tmp_path / "tensor.pt")

    save_checkpoint(tmp_path / "five.pt", build_model("smallcnn", 5))
    with pytest.raises(ValueError, match="was trained on 5 classes but the dataset has 3"):
        load_checkpoint_model(tmp_path / "five.pt", num_classes=3)
    save_checkpoint(tmp_path / "r18.pt", build_model("smallcnn", 3), arch="resnet18")
    with pytest.raises(ValueError, match="does not hold a 'resnet18' model"):
        load_checkpoint_model(tmp_path / "r18.pt", num_classes=3)
    with pytest.raises(ValueError, match="is a 'smallcnn' model, not 'resnet18'"):
        load_checkpoint_model(tmp_path / "checkpoint.pt", arch="resnet18")

    torch.save(model.state_dict(), tmp_path / "bare.pt")  # a bare state_dict records no architecture
    with pytest.raises(ValueError, match="records no architecture: pass --arch"):
        load_checkpoint_model(tmp_path / "bare.pt", num_classes=3)
    net, info = load_checkpoint_model(tmp_path / "bare.pt", num_classes=3, arch="smallcnn")
    assert info["image_size"] is None and torch.equal(net.head.weight, model.head.weight)


def test_prune_static_with_a_trained_model(data, index, tmp_path, reference_path, capsys):
    from fastprune.static import load_subset

    run = tmp_path / "run"
    assert cli.main(["train", str(data), "--out", str(run), "--arch", "smallcnn", "--epochs", "1",
                     "--batch-size", "8", "--image-size", "32", "--workers", "0", "--loader", "torch",
                     "--no-progress", "--policy", "full"]) == 0
    out = tmp_path / "s.json"
    assert cli.main(["prune-static", str(data), "--method", "influence", "--prune-ratio", "0.4", "--model",
                     str(run / "checkpoint.pt"), "--out", str(out), "--workers", "0", "--device", "cpu",
                     "--save-features", str(tmp_path / "f.npy"), "--no-progress", "--fp32"]) == 0
    keep, meta = load_subset(out, index=index)  # made for this dataset
    n = len(index)
    assert keep.numel() == meta["kept"] == n - round(0.4 * n) and keep.unique().numel() == keep.numel()
    assert meta["method"] == "influence" and meta["params"]["model"] == str(run / "checkpoint.pt")
    assert meta["params"]["arch"] == "smallcnn" and meta["params"]["image_size"] == 32
    assert meta["params"]["layer"] == "head" and meta["params"]["features"] is None
    assert meta["params"]["bf16"] is False

    saved = torch.from_numpy(np.load(tmp_path / "f.npy"))
    net, _ = load_checkpoint_model(run, num_classes=3)
    expect = extract_features(index, net, device="cpu", num_workers=0, image_size=32, progress=False)
    assert saved.shape == (n, 128) and torch.equal(saved, expect)
    # the same subset from the saved features: extraction is all that --model adds
    assert cli.main(["prune-static", str(data), "--method", "influence", "--prune-ratio", "0.4", "--features",
                     str(tmp_path / "f.npy"), "--out", str(tmp_path / "s2.json")]) == 0
    assert json.loads((tmp_path / "s2.json").read_text())["indices"] == keep.tolist()
    capsys.readouterr()

    # user errors: one line, exit status 2
    def error(*args):
        assert cli.main(["prune-static", str(data), "--out", str(tmp_path / "e.json"), "--workers", "0",
                         "--no-progress", *args]) == 2
        return capsys.readouterr().err

    assert "does not exist" in error("--method", "el2n", "--prune-ratio", "0.3", "--model", str(tmp_path / "no.pt"))
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    assert "is not a fastprune checkpoint" in error("--prune-ratio", "0.3", "--model", str(tmp_path / "junk.pt"))
    save_checkpoint(tmp_path / "five.pt", build_model("smallcnn", 5))
    assert "trained on 5 classes but the dataset has 3" in error("--prune-ratio", "0.3", "--model",
                                                                  str(tmp_path / "five.pt"))
    assert "needs --features" in error("--prune-ratio", "0.3")
    assert "must end in .npy or .pt" in error("--prune-ratio", "0.3", "--model", str(run), "--save-features", "f.txt")
    assert "or --model" in error("--method", "forgetting", "--prune-ratio", "0.3")
    assert not (tmp_path / "e.json").exists()
    with pytest.raises(SystemExit) as e:  # mutually exclusive
        cli.main(["prune-static", str(data), "--out", str(tmp_path / "e.json"), "--features", "f.npy", "--model",
                  str(run)])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
