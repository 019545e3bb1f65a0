import pytest
import torch

from rsgm.defenses.transforms import derive_seed, make_user_transform, parse_transform_spec

SECRET = b"0123456789abcdef-test-secret"


def reps(n=64, d=10, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_seed_depends_on_secret_user_and_purpose():
    s = derive_seed(SECRET, "alice", "x")
    assert s == derive_seed(SECRET, "alice", "x") and 0 <= s < 2**63
    assert s != derive_seed(SECRET, "bob", "x")
    assert s != derive_seed(SECRET + b"!", "alice", "x")
    assert s != derive_seed(SECRET, "alice", "y")
    with pytest.raises(ValueError, match="secret"):
        derive_seed(b"", "alice", "x")


@pytest.mark.parametrize("spec", ["affine", "pad", "add", "shuffle", "binary", "affine+pad+shuffle", "pad+shuffle"])
def test_transform_is_deterministic_per_user_and_differs_between_users(spec):
    r = reps()
    a1 = make_user_transform(spec, 10, SECRET, "alice")(r)
    a2 = make_user_transform(spec, 10, SECRET, "alice")(r)
    b = make_user_transform(spec, 10, SECRET, "bob")(r)
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, b)


def test_affine_is_well_conditioned_and_exactly_invertible():
    t = make_user_transform("affine", 10, SECRET, "alice").parts[0]
    s = torch.linalg.svdvals(t.matrix.double())
    assert s.max() / s.min() <= 4.0 + 1e-6
    r = reps()
    back = torch.linalg.solve(t.matrix.double(), (t(r).double() - t.shift.double()).T).T
    torch.testing.assert_close(back.float(), r, atol=1e-4, rtol=0)


def test_pad_add_shuffle_binary_shapes_and_content():
    r = reps()
    pad = make_user_transform("pad", 10, SECRET, "u")
    out = pad(r)
    assert out.shape == (64, 13) and torch.equal(out[:, :10], r)
    assert torch.equal(out[0, 10:], out[5, 10:])  # constants, the same for every query
    add = make_user_transform("add", 10, SECRET, "u").parts[0]
    out = add(r)
    assert out.shape == (64, 13) and torch.equal(out[:, add.data_pos], r)
    shuf = make_user_transform("shuffle", 10, SECRET, "u").parts[0]
    assert sorted(shuf.perm.tolist()) == list(range(10))
    torch.testing.assert_close(shuf(r).sort(dim=1).values, r.sort(dim=1).values)
    binary = make_user_transform("binary", 10, SECRET, "u")
    out = binary(r)
    assert out.shape == (64, 20) and set(out.unique().tolist()) <= {0.0, 1.0}


def test_composition_dims_and_bad_spec():
    t = make_user_transform("affine+pad+shuffle", 10, SECRET, "u")
    assert t.out_dim == 13 and t(reps()).shape == (64, 13)
    assert parse_transform_spec("none") == []
    assert torch.equal(make_user_transform("none", 10, SECRET, "u")(reps()), reps())
    with pytest.raises(ValueError, match="rotate"):
        parse_transform_spec("affine+rotate")
    with pytest.raises(ValueError, match="expects"):
        make_user_transform("affine", 10, SECRET, "u")(torch.randn(3, 9))
