"""Files rsgm writes and reads back never run code, and a wrong file is refused in one line."""

import json
import os
import pickle

import pytest
import torch

from rsgm.errors import RSGMError
from rsgm.lightning_modules.diffusion_attack import load_features_cache, save_features_cache
from rsgm.privacy.safe_files import load_tensors, save_tensors


class _Payload:
    """Unpickling this object creates a marker file (what a malicious cache would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _results(n=6, k=3):
    g = torch.Generator().manual_seed(0)
    return {"names": [f"f{j}" for j in range(k)], "features": torch.randn(n, k, generator=g, dtype=torch.float64),
            "is_member": torch.tensor([1, 0] * (n // 2)), "in_suspect": torch.tensor([1, 0] * (n // 2)),
            "index": torch.arange(n), "rows_per_sample": {"f": 2.0}}


def test_features_cache_round_trip(tmp_path):
    res = _results()
    path = save_features_cache(tmp_path / "features.safetensors", res, {"dl_t": 100})
    back = load_features_cache(path)
    assert back["names"] == res["names"] and back["config"] == {"dl_t": 100} and back["rows_per_sample"] == {"f": 2.0}
    for key in ("features", "is_member", "in_suspect", "index"):
        assert torch.equal(back[key], res[key])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"features{suffix}"
    with open(path, "wb") as fh:  # a torch.save-style zip would be refused the same way; a raw pickle too
        pickle.dump({"names": ["a"], "features": _Payload(marker)}, fh)
    with pytest.raises(RSGMError) as err:
        load_features_cache(path)
    assert "\n" not in str(err.value)
    assert not marker.exists()
    torch.save({"names": ["a"], "features": _Payload(marker)}, tmp_path / "zipped.pt")
    assert not marker.exists()  # saving does not run the payload
    with pytest.raises(RSGMError, match="refused|not plain"):
        load_features_cache(tmp_path / "zipped.pt")
    assert not marker.exists()


def test_legacy_pt_with_plain_data_still_loads(tmp_path):
    res = _results()
    torch.save(res, tmp_path / "features.pt")
    assert load_features_cache(tmp_path / "features.pt")["names"] == res["names"]


def test_wrong_version_kind_and_shape_are_refused(tmp_path):
    from safetensors.torch import save_file

    res = _results()
    path = save_features_cache(tmp_path / "ok.safetensors", res)
    tensors, meta = load_tensors(path, "rsgm.features")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "v9.safetensors"),
              metadata={"format": "rsgm.features", "version": "9", "meta": json.dumps(meta)})
    with pytest.raises(RSGMError, match="version 9"):
        load_features_cache(tmp_path / "v9.safetensors")
    save_tensors(tmp_path / "other.safetensors", "rsgm.mia_scores", {"x": torch.zeros(2)})
    with pytest.raises(RSGMError, match="format 'rsgm.mia_scores'"):
        load_features_cache(tmp_path / "other.safetensors")
    bad = dict(res, features=res["features"][:, :2])
    save_features_cache(tmp_path / "shape.safetensors", bad)
    with pytest.raises(RSGMError, match="do not match"):
        load_features_cache(tmp_path / "shape.safetensors")
    bad = dict(res, index=torch.zeros(6, dtype=torch.long))
    save_features_cache(tmp_path / "dup.safetensors", bad)
    with pytest.raises(RSGMError, match="repeated"):
        load_features_cache(tmp_path / "dup.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file at all")
    with pytest.raises(RSGMError, match="not a safetensors"):
        load_features_cache(tmp_path / "junk.safetensors")
