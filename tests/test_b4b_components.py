import numpy as np
import pytest
import torch
from PIL import Image

from rsgm.components.encoders import ResNet50, SmallConvEncoder, load_encoder_weights
from rsgm.datamodules.image_folder import B4BImageFolderDataModule, LazyImages, scan_image_folder


def test_resnet50_shape_and_simsiam_checkpoint_layout(tmp_path):
    torch.manual_seed(0)
    src = ResNet50()
    assert sum(p.numel() for p in src.parameters()) == 23_508_032  # torchvision resnet50 without fc
    sd = {f"module.encoder.{k}": v for k, v in src.state_dict().items()}
    sd["module.encoder.fc.0.weight"] = torch.zeros(2048, 2048)  # SimSiam projector, ignored
    sd["module.predictor.0.weight"] = torch.zeros(512, 2048)
    torch.save({"epoch": 100, "state_dict": sd}, tmp_path / "checkpoint_0099.pth.tar")
    dst = ResNet50()
    load_encoder_weights(dst, tmp_path / "checkpoint_0099.pth.tar")
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
    src.eval()
    assert src(torch.randn(1, 3, 64, 64)).shape == (1, 2048)
    assert ResNet50(out_dim=10).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="does not match"):
        load_encoder_weights(SmallConvEncoder(), tmp_path / "checkpoint_0099.pth.tar")
    with pytest.raises(FileNotFoundError, match="put the state dict there"):
        load_encoder_weights(dst, tmp_path / "missing.pth")


def _write_folder(root, classes=("a", "b"), n=3):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.random.RandomState(i).randint(0, 255, (40, 30, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_lazy_loading_and_errors(tmp_path):
    _write_folder(tmp_path / "q" / "train", n=6)
    _write_folder(tmp_path / "t" / "train")
    _write_folder(tmp_path / "t" / "test")
    files, labels = scan_image_folder(tmp_path / "t" / "train", "task")
    assert len(files) == 6 and labels.tolist() == [0, 0, 0, 1, 1, 1]
    lazy = LazyImages(files, 24)
    assert isinstance(lazy[1:3], LazyImages) and lazy[torch.tensor([0, 5])].shape == (2, 3, 24, 24)
    dm = B4BImageFolderDataModule(str(tmp_path / "q" / "train"), {"toy": {"train": str(tmp_path / "t" / "train"), "test": str(tmp_path / "t" / "test")}},
                                  attack_queries=[4, 8], sybils=[2], sybil_overlap=2, image_size=24, batch_size=4)
    dm.setup("test")
    assert [a.user_id for a in dm.accounts] == ["legit-toy", "attack-4", "attack-8", "sybil2x4-0", "sybil2x4-1"]
    batch = next(iter(dm.test_dataloader()))
    assert batch["x"].shape == (4, 3, 24, 24) and batch["user_id"] == "legit-toy"
    with pytest.raises(FileNotFoundError, match="imagenet"):
        B4BImageFolderDataModule(str(tmp_path / "imagenet"), {}).setup("test")
