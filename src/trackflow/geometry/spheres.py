"""dipy's named spheres, read from dipy's own data files without importing ``dipy.data``.

``dipy.data`` imports dipy's tractogram I/O and, through it, vtk: about 1.3 s of every tracking run's
start-up (measured), for a table of vertices. The file names are those of ``dipy.data.SPHERE_FILES``.
"""

from importlib.util import find_spec
from pathlib import Path

import numpy as np
from dipy.core.sphere import Sphere

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
        # Sphere normalises the stored vertices, as get_sphere does (they differ by up to 7e-8)
        return Sphere(xyz=np.asarray(data["vertices"], dtype=np.float64)).vertices
