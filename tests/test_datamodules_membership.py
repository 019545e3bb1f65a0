"""Membership DataModules: batch shape, P/U composition, local-folder formats, clear errors."""

import json

import pytest
import torch
from PIL import Image

from rsgm.datamodules.membership import (
    COCOCaptionsMembership, DigitsDiffusionData, DigitsMembership, ImageNetMembership, center_crop_resize, digits_split,
)


def batches(dm):
    dm.setup("test")
    return list(dm.test_dataloader())


def test_digits_balanced_imbalanced_contaminated():
    dm = DigitsMembership(n_suspect=40, n_reference=60, contamination=0.25, batch_size=32)
    rows = batches(dm)
    b = rows[0]
    assert set(b) == {"x", "cond", "is_member", "in_suspect", "index"}
    assert b["x"].shape == (32, 1, 8, 8) and b["x"].min() >= -1 and b["x"].max() <= 1
    mem = torch.cat([r["is_member"] for r in rows])
    sus = torch.cat([r["in_suspect"] for r in rows])
    assert int(sus.sum()) == 40 and int((sus == 0).sum()) == 60
    assert int((mem * sus).sum()) == 30 and int(mem[sus == 0].sum()) == 0  # 10 non-members contaminate P
    assert torch.equal(torch.cat([r["index"] for r in rows]), torch.arange(100))


def test_digits_split_recorded_by_training_data(tmp_path):
    data = DigitsDiffusionData(n_members=50)
    assert len(data.split["members"]) == 50 and len(data.split["nonmembers"]) == 1797 - 50
    assert data.split["members"] == digits_split(0)["members"][:50]
    path = tmp_path / "membership.json"
    path.write_text(json.dumps(data.split))
    dm = DigitsMembership(split_file=str(path))
    rows = batches(dm)
    assert int(torch.cat([r["is_member"] for r in rows]).sum()) == 50
    with pytest.raises(FileNotFoundError, match="rsgm fit --config configs/dm_digits.yaml"):
        DigitsMembership(split_file=str(tmp_path / "nope.json")).setup()
    with pytest.raises(ValueError, match="need"):
        DigitsMembership(split_file=str(path), n_suspect=60).setup()


def _img(path, size=(40, 30), color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_imagenet_folders(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for syn in ("n02", "n01"):
            for i in range(n):
                _img(tmp_path / split / syn / f"{split}_{i}.JPEG")
    dm = ImageNetMembership(root=str(tmp_path), image_size=16, n_suspect=4, n_reference=4, batch_size=8)
    (b,) = batches(dm)
    assert b["x"].shape == (8, 3, 16, 16) and set(b["cond"].tolist()) <= {0, 1}
    assert b["is_member"].tolist() == [1] * 4 + [0] * 4
    with pytest.raises(FileNotFoundError, match="put the ImageNet-1k train images there"):
        ImageNetMembership(root=str(tmp_path / "x")).pools()


def test_center_crop_resize_crops_the_middle():
    img = Image.new("RGB", (30, 10), (0, 0, 0))
    img.paste((255, 255, 255), (10, 0, 20, 10))  # white middle third
    x = center_crop_resize(img, 10)
    assert x.shape == (3, 10, 10) and float(x.mean()) > 0.9


def test_coco_captions(tmp_path):
    for split in ("train", "val"):
        images, anns = [], []
        for i in range(3):
            _img(tmp_path / f"{split}2014" / f"{split}_{i}.jpg")
            images.append({"id": i, "file_name": f"{split}_{i}.jpg"})
            anns += [{"id": 10 * i + 2, "image_id": i, "caption": f"second {split} {i}"},
                     {"id": 10 * i + 1, "image_id": i, "caption": f"first {split} {i} "}]
        (tmp_path / "annotations").mkdir(exist_ok=True)
        (tmp_path / "annotations" / f"captions_{split}2014.json").write_text(json.dumps({"images": images, "annotations": anns}))
    dm = COCOCaptionsMembership(root=str(tmp_path), image_size=8, batch_size=6)
    (b,) = batches(dm)
    assert len(b["cond"]) == 6 and all(c.startswith("first") for c in b["cond"])
    assert sum("train" in c for c in b["cond"][:3]) == 3
    (tmp_path / "annotations" / "captions_val2014.json").unlink()
    with pytest.raises(FileNotFoundError, match="captions_val2014.json"):
        COCOCaptionsMembership(root=str(tmp_path)).setup()
