"""Fine-label digits (the CFG-difference testbed): k-means labels within each digit class."""

import pytest
import torch

from rsgm.datamodules.iar_digits import FineDigitsData, FineDigitsMembership, all_fine_labels, fine_digit_labels
from rsgm.datamodules.membership import digits_images


def test_fine_labels_hand_case():
    # class 0: three images near +1 and two near -1; class 1: one near +1, two near -1
    base = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, 1.0, -1.0, -1.0])
    x = (base.view(-1, 1, 1, 1) + 0.01 * torch.arange(8.0).view(-1, 1, 1, 1)).expand(-1, 1, 2, 2)
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    lab = fine_digit_labels(x, y, 2, seed=0)
    # the larger cluster of each class is number 0: label = digit * 2 + rank by size
    assert lab.tolist() == [0, 0, 0, 1, 1, 3, 2, 2]
    with pytest.raises(ValueError, match="fewer than"):
        fine_digit_labels(x, y, 4)


def test_fine_labels_of_all_digits_are_deterministic_and_nested():
    x, y = digits_images()
    a, b = all_fine_labels(8), all_fine_labels(8)
    assert torch.equal(a, b) and torch.equal(a // 8, y) and len(torch.unique(a)) == 80
    sizes = torch.bincount(a, minlength=80).view(10, 8)
    assert (sizes[:, :-1] >= sizes[:, 1:]).all()  # numbered by decreasing size within each digit


def test_fine_datamodules_use_the_same_labels():
    labels = all_fine_labels(8)
    train = FineDigitsData(clusters_per_class=8, n_members=50)
    train.setup()
    members = torch.tensor(train.split["members"])
    assert torch.equal(train.train_set.y, labels[members])
    audit = FineDigitsMembership(clusters_per_class=8, n_suspect=10, n_reference=10)
    audit.setup()
    for row in audit.dataset.rows:
        assert int(audit.load(row[0])[1]) == int(labels[row[0]])
