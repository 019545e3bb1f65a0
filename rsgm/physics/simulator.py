"""A built-in synthetic Zero Degree Calorimeter: a physically motivated toy, not noise.

It stands in for the published GEANT4 pickles so that everything runs offline. Each sample
is one particle (9 conditions: ``Energy, Vx, Vy, Vz, Px, Py, Pz, mass, charge``) and its
photon-count image on the neutron (44x44) or proton (56x30) fibre grid:

* **Conditions** come from plausible ranges: energy log-uniform in 20-3000 GeV, a vertex
  spread of ~50 um transversely and 5 cm along the beam, beam-divergence angles of
  ~0.15 mrad, and a mix of particle species (neutrons, K0L, protons, pions).
* **Shower centre**: the vertex plus the momentum direction propagated to the calorimeter
  face 112.5 m downstream (charged particles are additionally bent by the beam-line
  magnets, proportionally to charge / momentum).
* **Photon yield** grows linearly with energy and every fibre count is Poisson distributed.
* **Three response regimes** by energy: low (< 150 GeV) dispersed showers with low light
  collection, medium, and high (> 800 GeV) intensity focused showers.
* **Repeated conditions**: every particle is simulated 1-``max_repeats`` times, as in the
  published data. Neutral hadrons respond consistently (only Poisson noise), charged hadrons
  stochastically (random shower-start depth, lateral kick and width), so per-condition
  diversity differs between conditions, which is what SDI-GAN's selective term exploits.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CONDITION_COLUMNS = ("Energy", "Vx", "Vy", "Vz", "Px", "Py", "Pz", "mass", "charge")
IMAGE_SHAPES = {"neutron": (44, 44), "proton": (56, 30)}

# (name, mass GeV, charge, relative abundance); charged species give diverse responses.
_SPECIES = (
    ("neutron", 0.9396, 0, 0.40),
    ("k0l", 0.4976, 0, 0.10),
    ("proton", 0.9383, 1, 0.25),
    ("pi+", 0.1396, 1, 0.15),
    ("pi-", 0.1396, -1, 0.10),
)
_DISTANCE_CM = 11250.0  # interaction point to calorimeter face
_PIXEL_CM = {"neutron": 0.16, "proton": 0.40}
_YIELD_PER_GEV = 1.1
_REGIME_EDGES_GEV = (150.0, 800.0)


def _image_shape(detector: str) -> tuple[int, int]:
    if detector not in IMAGE_SHAPES:
        raise ValueError(f"unknown detector {detector!r}; choose one of {sorted(IMAGE_SHAPES)}")
    return IMAGE_SHAPES[detector]


def sample_conditions(n_particles: int, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    """Draw ``n_particles`` distinct particles; returns the condition table and a charged flag."""
    names, masses, charges, weights = zip(*_SPECIES)
    species = rng.choice(len(names), size=n_particles, p=np.asarray(weights) / sum(weights))
    mass = np.asarray(masses)[species]
    charge = np.asarray(charges, dtype=np.float64)[species]
    energy = np.exp(rng.uniform(np.log(20.0), np.log(3000.0), n_particles))
    theta_x, theta_y = rng.normal(0.0, 1.5e-4, (2, n_particles))
    p = np.sqrt(np.maximum(energy**2 - mass**2, 1e-6))
    pz = p / np.sqrt(1.0 + theta_x**2 + theta_y**2)
    table = pd.DataFrame(
        {
            "Energy": energy,
            "Vx": rng.normal(0.0, 5e-3, n_particles),
            "Vy": rng.normal(0.0, 5e-3, n_particles),
            "Vz": rng.normal(0.0, 5.0, n_particles),
            "Px": pz * theta_x,
            "Py": pz * theta_y,
            "Pz": pz,
            "mass": mass,
            "charge": charge,
        },
        columns=list(CONDITION_COLUMNS),
    )
    return table, charge != 0


def _render(cond: pd.DataFrame, charged: np.ndarray, detector: str, rng: np.random.Generator) -> np.ndarray:
    """Photon-count images ``(N, H, W)`` for one chunk of (already repeated) conditions."""
    rows, cols = _image_shape(detector)
    n = len(cond)
    energy = cond["Energy"].to_numpy()
    pz = cond["Pz"].to_numpy()
    pixel = _PIXEL_CM[detector]
    # Transverse position at the calorimeter face, in pixels from the image centre.
    x = (cond["Vx"].to_numpy() + cond["Px"].to_numpy() / pz * _DISTANCE_CM) / pixel
    y = (cond["Vy"].to_numpy() + cond["Py"].to_numpy() / pz * _DISTANCE_CM) / pixel
    x = x + cond["charge"].to_numpy() * 600.0 / energy  # magnetic bending of charged hadrons

    low = energy < _REGIME_EDGES_GEV[0]
    high = energy >= _REGIME_EDGES_GEV[1]
    width = np.where(low, 6.5, np.where(high, 1.3, 3.0)) * (1.0 + 0.1 * np.log(3000.0 / energy))
    collected = np.where(low, 0.35, np.where(high, 1.0, 0.7)) * np.full(n, 0.9)

    # Charged hadrons: random shower-start depth (lost light), lateral kick and width change.
    k = int(charged.sum())
    if k:
        collected[charged] *= rng.uniform(0.15, 1.0, k)
        x[charged] += rng.normal(0.0, 3.0, k)
        y[charged] += rng.normal(0.0, 3.0, k)
        width[charged] *= rng.lognormal(0.0, 0.35, k)
    # Neutral hadrons: a few-percent event-to-event jitter only.
    collected[~charged] *= rng.normal(1.0, 0.02, n - k)

    r = np.arange(rows) - (rows - 1) / 2.0
    c = np.arange(cols) - (cols - 1) / 2.0
    profile_r = np.exp(-0.5 * ((r[None, :] - y[:, None]) / width[:, None]) ** 2) / (np.sqrt(2 * np.pi) * width[:, None])
    profile_c = np.exp(-0.5 * ((c[None, :] - x[:, None]) / width[:, None]) ** 2) / (np.sqrt(2 * np.pi) * width[:, None])
    mean_photons = (_YIELD_PER_GEV * energy * collected)[:, None, None] * profile_r[:, :, None] * profile_c[:, None, :]
    return rng.poisson(mean_photons).astype(np.float32)


def simulate_zdc(
    n_samples: int,
    detector: str = "neutron",
    seed: int = 0,
    max_repeats: int = 6,
    chunk_size: int = 8192,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Simulate ``n_samples`` responses; returns images ``(N, H, W)`` (float32 photon
    counts) and the 9-column condition table, in the published pickles' layout."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    if max_repeats < 1:
        raise ValueError(f"max_repeats must be at least 1, got {max_repeats}")
    rows, cols = _image_shape(detector)
    rng = np.random.default_rng(seed)
    repeats = rng.integers(1, max_repeats + 1, size=n_samples)
    n_particles = int(np.searchsorted(np.cumsum(repeats), n_samples) + 1)
    particles, charged = sample_conditions(n_particles, rng)
    rows_of = np.repeat(np.arange(n_particles), repeats[:n_particles])[:n_samples]
    cond = particles.iloc[rows_of].reset_index(drop=True)
    charged = charged[rows_of]
    images = np.empty((n_samples, rows, cols), dtype=np.float32)
    for start in range(0, n_samples, chunk_size):
        stop = min(start + chunk_size, n_samples)
        images[start:stop] = _render(cond.iloc[start:stop], charged[start:stop], detector, rng)
    return images, cond


def resimulate_zdc(conditions: np.ndarray | pd.DataFrame, detector: str = "neutron", seed: int = 0,
                   chunk_size: int = 8192) -> np.ndarray:
    """A second, independent Monte-Carlo run for the given particles: photon-count images
    ``(N, H, W)`` for ``conditions`` (``(N, 9)`` in ``CONDITION_COLUMNS`` order, or a table
    with those columns), with fresh randomness from ``seed`` (Poisson counts and, for
    charged particles, shower start, kick and width). Comparing it with the first run's
    responses gives the Monte-Carlo row of thesis Table 5.4.2."""
    table = conditions if isinstance(conditions, pd.DataFrame) else pd.DataFrame(np.asarray(conditions), columns=list(CONDITION_COLUMNS))
    missing = [c for c in CONDITION_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"conditions lack the columns {missing}")
    rows, cols = _image_shape(detector)
    rng = np.random.default_rng(seed)
    charged = table["charge"].to_numpy() != 0
    images = np.empty((len(table), rows, cols), dtype=np.float32)
    for start in range(0, len(table), chunk_size):
        stop = min(start + chunk_size, len(table))
        images[start:stop] = _render(table.iloc[start:stop], charged[start:stop], detector, rng)
    return images
