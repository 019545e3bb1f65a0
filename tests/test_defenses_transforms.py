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


@pytest.mark.parametrize("d", [10, 64, 100])
def test_structured_map_is_orthogonal_and_mixes(d):
    from rsgm.defenses.transforms import StructuredOrthogonal

    q = StructuredOrthogonal(d, torch.Generator().manual_seed(0)).matrix()
    torch.testing.assert_close(q @ q.T, torch.eye(d, dtype=torch.float64), atol=1e-6, rtol=0)
    if d == 64:  # one Hadamard block: outputs mix most inputs and none dominates (a permutation would be 1)
        assert (q.abs() > 1e-9).double().mean() > 0.7 and q.abs().max() <= 0.5 + 1e-9


def test_defense_transform_cache_is_bounded_and_rederives_the_same_map(tmp_path):
    from rsgm.defenses.b4b import B4BDefense

    d = B4BDefense(16, tmp_path / "s.sqlite", SECRET, transform="affine", noise="static", cache_size=3, n_proj=4, n_bits=6)
    r = reps(8, 16)
    first = d.transform_for("u0")(r)
    for i in range(10):
        d.transform_for(f"u{i}")
    assert len(d._transforms) == 3 and "u0" not in d._transforms
    torch.testing.assert_close(d.transform_for("u0")(r), first)  # evicted, re-derived from the secret


def test_transforms_defeat_naive_sybil_pooling_but_not_remapping():
    from rsgm.defenses.stealing import mean_cosine_distance, remap_sybils

    r = reps(300, 32)
    a = make_user_transform("affine", 32, SECRET, "sybil-0")(r)
    b = make_user_transform("affine", 32, SECRET, "sybil-1")(r)
    assert mean_cosine_distance(a, b) > 0.5  # pooling raw answers mixes two unrelated spaces
    pooled, fid = remap_sybils([a, b], overlap=100, holdout=50, grid=[8, 50])
    assert pooled.shape == (300 + 200, 32)
    torch.testing.assert_close(pooled[300:], a[100:], atol=1e-3, rtol=1e-3)  # 100 shared queries undo it
    assert fid[0]["cosine_distance"] > 10 * fid[1]["cosine_distance"]  # 8 shared queries do not
