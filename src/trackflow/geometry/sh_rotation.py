"""Rotations of real, symmetric spherical-harmonic (SH) coefficients, and random 3D rotations.

A rotation R of the space maps a spherical function f to f'(u) = f(R^T u). On the SH coefficients (column
vector c) this is a linear map c -> M(R) c, block-diagonal per degree l (each band is rotation-invariant)
and orthogonal for an orthonormal basis. ``sh_rotation_matrices`` computes M numerically and exactly from
dipy's basis: the basis B evaluated at fixed points u and at R^T u; since f' lies in the span of the same
basis, the least-squares fit through as many points as coefficients or more is exact (up to rounding).

Bases: scilpy 2.x names of dipy's non-legacy bases (``descoteaux07``, ``tournier07``; dipy ``legacy=False``).
Directions are in the frame of the volume's voxel axes, as the SH of the volumes (isotropic voxels only).
"""

import warnings
from functools import lru_cache

import numpy as np
from dipy.core.sphere import Sphere
from dipy.reconst.shm import sh_to_sf_matrix

from trackflow.errors import TrackflowError

SH_BASES = ("descoteaux07", "tournier07")
# Fit points: a Fibonacci sphere with twice as many points as coefficients (plus a few): exact and well
# conditioned, and cheap (the basis is evaluated at K * N points per batch of K rotations).
def _n_fit_points(n_coeffs: int) -> int:
    return 2 * n_coeffs + 10


def sh_order_of_count(count: int) -> int:
    """The even order l of ``count`` = (l+1)(l+2)/2 symmetric SH coefficients, else a TrackflowError."""
    for order in range(0, 40, 2):
        if (order + 1) * (order + 2) // 2 == count:
            return order
    raise TrackflowError(f"{count} SH coefficients is no symmetric SH order: (l+1)(l+2)/2 for an even l, "
                         "i.e. 1, 6, 15, 28, 45, 66, 91, ...")


def fibonacci_sphere(n: int) -> np.ndarray:
    """``n`` nearly uniform unit vectors [n, 3] (deterministic)."""
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    phi = np.pi * (1 + 5 ** 0.5) * i
    r = np.sqrt(1 - z ** 2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def sh_basis_matrix(points: np.ndarray, sh_order: int, basis: str) -> np.ndarray:
    """B [C, N]: sf = coefficients @ B at the unit vectors ``points`` [N, 3] (dipy's ``sh_to_sf`` layout)."""
    if basis not in SH_BASES:
        raise TrackflowError(f"unknown SH basis {basis!r}; expected one of {list(SH_BASES)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dipy's notes on basis versions
        return sh_to_sf_matrix(Sphere(xyz=np.asarray(points, dtype=np.float64)), sh_order_max=sh_order,
                               basis_type=basis, legacy=False, return_inv=False)


@lru_cache(maxsize=8)
def _fit_operator(sh_order: int, basis: str) -> tuple[np.ndarray, np.ndarray]:
    """Fit points u [N, 3] and pinv(B(u)) [N, C], so that c = f(u) @ pinv."""
    points = fibonacci_sphere(_n_fit_points((sh_order + 1) * (sh_order + 2) // 2))
    return points, np.linalg.pinv(sh_basis_matrix(points, sh_order, basis))


def sh_rotation_matrices(rotations: np.ndarray, sh_order: int, basis: str = "descoteaux07") -> np.ndarray:
    """M(R) [K, C, C] for rotations R [K, 3, 3]: coefficients c (column) of f give M c, those of f(R^T u).

    Off-band entries (rounding only) are set to exactly zero.
    """
    rotations = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
    points, pinv = _fit_operator(sh_order, basis)
    # R^T u for each rotation: (R^T u)_i = sum_j R_ji u_j.   [K, N, 3]
    rotated = np.einsum("kji,nj->kni", rotations, points)
    n_coeffs = pinv.shape[1]
    basis_at = sh_basis_matrix(rotated.reshape(-1, 3), sh_order, basis)          # [C, K*N]
    basis_at = basis_at.reshape(n_coeffs, len(rotations), len(points)).transpose(1, 0, 2)  # [K, C, N]
    # Row form: c'^T = c^T B(R^T u) pinv(B(u)), so M = (B(R^T u) pinv)^T.
    matrices = np.einsum("kcn,nd->kdc", basis_at, pinv)
    degree = _degrees(sh_order)
    matrices[:, degree[:, None] != degree[None, :]] = 0.0
    return matrices


def _degrees(sh_order: int) -> np.ndarray:
    """The degree l of each coefficient (dipy's ordering: by l, then m)."""
    return np.concatenate([[l] * (2 * l + 1) for l in range(0, sh_order + 1, 2)])


def random_rotations(rng: np.random.Generator, n: int, max_angle_deg: float, axis=None) -> np.ndarray:
    """``n`` rotation matrices [n, 3, 3]: axis uniform on the sphere, angle uniform in [0, max_angle_deg]; or,
    with a given ``axis`` [3], about that axis with an angle uniform in [-max_angle_deg, max_angle_deg].

    Draws, in this order, ``rng.normal(size=(n, 3))`` (axes, also when one is given) and
    ``rng.uniform(size=n)`` (angles).
    """
    axes = rng.normal(size=(n, 3))
    uniform = rng.uniform(size=n)
    if axis is not None:
        axes = np.broadcast_to(np.asarray(axis, dtype=np.float64), (n, 3))
        uniform = 2 * uniform - 1
    axes = axes / np.maximum(np.linalg.norm(axes, axis=1, keepdims=True), 1e-12)
    return axis_angle_matrices(axes, np.deg2rad(max_angle_deg) * uniform)


def axis_angle_matrices(axes: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Rodrigues: rotations [n, 3, 3] of ``angles`` (radians) about the unit ``axes`` [n, 3]."""
    axes = np.asarray(axes, dtype=np.float64).reshape(-1, 3)
    angles = np.asarray(angles, dtype=np.float64).reshape(-1)
    x, y, z = axes.T
    zero = np.zeros_like(x)
    cross = np.stack([np.stack([zero, -z, y], -1), np.stack([z, zero, -x], -1),
                      np.stack([-y, x, zero], -1)], 1)                          # [n, 3, 3]
    sin, cos = np.sin(angles)[:, None, None], np.cos(angles)[:, None, None]
    return np.eye(3) + sin * cross + (1 - cos) * (cross @ cross)
