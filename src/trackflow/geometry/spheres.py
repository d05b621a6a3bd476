"""dipy's named spheres, read from dipy's own data files without importing ``dipy.data``.

``dipy.data`` imports dipy's tractogram I/O and, through it, vtk: about 1.3 s of every tracking run's
start-up (measured), for a table of vertices; ``dipy.core.sphere`` imports scipy's optimize and spatial
modules, another 0.2 s, for a normalisation. The file names are those of ``dipy.data.SPHERE_FILES``.
"""

from importlib.util import find_spec
from pathlib import Path

import numpy as np
from dipy.core.geometry import cart2sphere, sphere2cart

from trackflow.errors import TrackflowError

SPHERE_FILES = {
    "symmetric362": "evenly_distributed_sphere_362.npz",
    "symmetric642": "evenly_distributed_sphere_642.npz",
    "symmetric724": "evenly_distributed_sphere_724.npz",
    "repulsion724": "repulsion724.npz",
    "repulsion100": "repulsion100.npz",
    "repulsion200": "repulsion200.npz",
}


def sphere_vertices(name: str) -> np.ndarray:
    """The unit vertices [V, 3] (float64) of dipy's sphere ``name``, in file order (the class index of a
    classification head): ``dipy.data.get_sphere(name=name).vertices`` bit for bit."""
    if name not in SPHERE_FILES:
        raise TrackflowError(f"unknown dipy sphere {name!r}; known: {', '.join(SPHERE_FILES)}.")
    path = Path(find_spec("dipy").submodule_search_locations[0]) / "data" / "files" / SPHERE_FILES[name]
    with np.load(path) as data:
        xyz = np.asarray(data["vertices"], dtype=np.float64)
    # get_sphere's Sphere(xyz=...) normalises the stored vertices (they differ by up to 7e-8) through polar
    # angles and back: the same two dipy functions give its vertices bit for bit.
    _, theta, phi = cart2sphere(*xyz.T)
    return np.column_stack(sphere2cart(1, theta, phi))
