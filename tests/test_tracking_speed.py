"""What makes tracking fast without changing a result: a start-up without vtk, the seed range split across
processes (``--processes``) or jobs (``--seed_range`` + ``trackflow_merge_tractograms``), bit for bit."""

import re
import subprocess
import sys
import time


def test_a_tracking_run_does_not_import_vtk(experiment, tmp_path):
    # dipy.io.streamline imports vtk, and dipy.data imports dipy.io.streamline: 1.3 s of every tracking run's
    # start-up; any dipy.io imports pandas, another 0.4-0.5 s; dipy.core.sphere imports scipy.optimize and
    # scipy.spatial, 0.2 s. The whole run counts: the model classes (a sphere-classification head here) load
    # lazily.
    hdf5, folder, _ = experiment
    out = tmp_path / "out.trk"
    code = ("import sys\nfrom trackflow.cli.track import l2t_main\n"
            f"l2t_main([{str(folder)!r}, {SUBJECT!r}, 'input', {str(out)!r}, 'interface_mask', '--hdf5_file', "
            f"{str(hdf5)!r}, '--nt', '5', '--processes', '1'])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('vtk', 'fury', 'pandas')\n"
            "             or m.startswith(('dipy.io', 'dipy.core.sphere', 'scipy.optimize', 'scipy.spatial'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.exists()
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_process_age_counts_from_the_process_start():
    code = ("import time\ntime.sleep(0.5)\nfrom trackflow.device import seconds_since_process_start\n"
            "print(seconds_since_process_start())")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    age = float(done.stdout.split()[-1])
    assert 0.5 <= age <= wall + 0.02, (age, wall)  # /proc counts in 10 ms ticks


def test_a_tracking_run_logs_its_start_up_and_the_time_of_each_phase(experiment, tmp_path):
    hdf5, folder, _ = experiment
    done = subprocess.run([sys.executable, "-c", "from trackflow.cli.track import l2t_main; l2t_main()", str(folder),
                           SUBJECT, "input", str(tmp_path / "out.trk"), "interface_mask", "--hdf5_file", str(hdf5),
                           "--nt", "5", "--processes", "1", "-v"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    start_up = re.search(r"start-up: ([0-9.]+) s from the process start", done.stderr)
    assert start_up and 0.0 < float(start_up.group(1)) < 60, done.stderr
    assert re.search(r"times: reading the model and the subject [0-9.]+ s, tracking [0-9.]+ s, filtering and "
                     r"writing [0-9.]+ s", done.stderr), done.stderr


_FAULTS_OF_STEPS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from trackflow.device import keep_freed_host_memory
    assert keep_freed_host_memory()
torch.set_num_threads(1)
volume, index = torch.rand(64, 64, 64, 30), torch.randint(0, 64 ** 3, (28000,))
def step():  # a tracking step's pattern: temporaries of 3-27 MB, all freed at its end
    values = volume.reshape(-1, 30).index_select(0, index.repeat(8))
    doubled = values * 2
    return doubled.view(-1, 8, 30).sum(1).sum()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_freed_step_memory_is_reused_without_page_faults():
    # glibc's defaults unmapped (or trimmed) a step's large temporaries, and every next step faulted their
    # pages in again: a fifth of a CPU tracking run in the kernel. track_in_processes sets this up.
    faults = {}
    for mode in ("default", "keep"):
        done = subprocess.run([sys.executable, "-c", _FAULTS_OF_STEPS, mode], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        faults[mode] = int(done.stdout.split()[-1])
    # Measured: 150,000-720,000 page faults by default, 0-13,000 (a one-time growth of the heap) kept.
    assert faults["default"] > 50_000, faults
    assert faults["keep"] < faults["default"] / 5, faults


def test_the_vectorised_trk_writer_writes_what_nibabel_writes(tmp_path):
    # An oblique grid, streamlines of 1 to 30 points, seeds (per-streamline data) and two per-point arrays.
    affine = np.array([[-1.2, 0.1, 0, 30], [0.1, 1.3, 0, -20], [0, 0, 1.1, 5], [0, 0, 0, 1]])
    reference = nib.Nifti1Image(np.zeros((20, 30, 10), np.float32), affine)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 31, 200)
    lines = [rng.uniform(0, 10, (n, 3)).astype(np.float32) for n in lengths]
    seeds = rng.uniform(0, 10, (200, 3)).astype(np.float32)
    dpp = {"loss": rng.uniform(size=lengths.sum()), "rgb": rng.uniform(size=(lengths.sum(), 3))}
    ours = tmp_path / "ours.trk"
    save_tractogram_file(ours, lines, reference, seeds=seeds, data_per_point=dpp)

    offsets = np.cumsum(lengths) - lengths
    header = {nib.streamlines.Field.VOXEL_TO_RASMM: affine, nib.streamlines.Field.VOXEL_SIZES:
              reference.header.get_zooms()[:3], nib.streamlines.Field.DIMENSIONS: reference.shape[:3],
              nib.streamlines.Field.VOXEL_ORDER: "".join(nib.aff2axcodes(affine))}
    rasmm = [nib.affines.apply_affine(affine, line - 0.5) for line in lines]  # vox/corner -> RASMM
    tractogram = nib.streamlines.Tractogram(
        rasmm, data_per_streamline={"seeds": seeds - 0.5}, affine_to_rasmm=np.eye(4),
        data_per_point={k: [np.reshape(v, (len(v), -1))[o:o + n] for o, n in zip(offsets, lengths)]
                        for k, v in dpp.items()})
    theirs = tmp_path / "theirs.trk"
    nib.streamlines.save(nib.streamlines.TrkFile(tractogram, header=header), str(theirs))

    assert ours.read_bytes()[:1000] == theirs.read_bytes()[:1000]  # the header, counts and names included
    assert ours.stat().st_size == theirs.stat().st_size
    a, b = nib.streamlines.load(str(ours)), nib.streamlines.load(str(theirs))
    np.testing.assert_array_equal(a.streamlines._lengths, b.streamlines._lengths)
    np.testing.assert_allclose(a.streamlines.get_data(), b.streamlines.get_data(), atol=1e-4)
    np.testing.assert_array_equal(a.tractogram.data_per_streamline["seeds"], b.tractogram.data_per_streamline["seeds"])
    for key in dpp:
        np.testing.assert_array_equal(a.tractogram.data_per_point[key].get_data(),
                                      b.tractogram.data_per_point[key].get_data())
    empty = tmp_path / "empty.trk"
    save_tractogram_file(empty, [], reference, seeds=np.zeros((0, 3), np.float32))
    assert len(nib.streamlines.load(str(empty)).streamlines) == 0


def test_dipy_spheres_are_read_without_dipy_data():
    from dipy.data import get_sphere
    for name in SPHERE_FILES:
        np.testing.assert_array_equal(sphere_vertices(name), get_sphere(name=name).vertices)
    with pytest.raises(TrackflowError, match="unknown dipy sphere 'nope'"):
        sphere_vertices("nope")


import nibabel as nib
import numpy as np
import pytest
import trx.trx_file_memmap as tmm

from trackflow.cli.merge_tractograms import main as merge_main
from trackflow.cli.track import l2t_main, tt_main
from trackflow.data.tractograms import save_tractogram_file
from trackflow.errors import TrackflowError
from trackflow.geometry.spheres import SPHERE_FILES, sphere_vertices
from test_tracking_cli import SUBJECT, l2t_model, tto_model  # noqa: E402  (tests/ is on sys.path)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N_SEEDS = 40


@pytest.fixture(scope="module")
def experiments(tiny_hdf5, make_experiment, tmp_path_factory):
    from trackflow.data.hdf5.reader import HDF5Cohort
    with HDF5Cohort(tiny_hdf5) as cohort:
        nb_features = cohort.volume_groups()["input"]
    root = tmp_path_factory.mktemp("speed")
    return {"l2t": (tiny_hdf5, make_experiment(root / "l2t", l2t_model(nb_features)), l2t_main),
            "tto": (tiny_hdf5, make_experiment(root / "tto", tto_model(nb_features)), tt_main)}


@pytest.fixture
def experiment(experiments):
    return experiments["l2t"]


def track(experiment, out, *extra):
    hdf5, folder, main = experiment
    main([str(folder), SUBJECT, "input", str(out), "interface_mask", "--hdf5_file", str(hdf5),
              "--tracking_mask_group", "wm_mask", "--min_length", "3", "--rng_seed", "4", "--max_length", "40",
              "--nt", str(N_SEEDS), "-f", *extra])
    return out


@pytest.mark.parametrize("algo", ["det", "prob"])
@pytest.mark.parametrize("kind", ["l2t", "tto"])
def test_any_number_of_processes_gives_the_same_tractogram(experiments, tmp_path, kind, algo):
    experiment = experiments[kind]
    outputs = [track(experiment, tmp_path / f"{n}.trk", "--algo", algo, "--save_seeds", "--processes", str(n))
               for n in (1, 2, 3)]
    one = nib.streamlines.load(str(outputs[0])).streamlines
    assert len(one) > 20 and len(set(one._lengths.tolist())) > 3
    for other in outputs[1:]:
        assert other.read_bytes() == outputs[0].read_bytes()


@pytest.mark.parametrize("kind, algo, ext", [("l2t", "det", ".trk"), ("l2t", "prob", ".trk"), ("l2t", "det", ".tck"),
                                             ("l2t", "prob", ".trx"), ("tto", "det", ".trk"), ("tto", "prob", ".trk")])
def test_merged_seed_range_chunks_equal_the_whole_run(experiments, tmp_path, kind, algo, ext):
    experiment = experiments[kind]
    seeds = ["--save_seeds"] if ext != ".tck" else []
    whole = track(experiment, tmp_path / f"whole{ext}", "--algo", algo, "--processes", "1", *seeds)
    bounds = [0, 13, 27, N_SEEDS]
    chunks = [track(experiment, tmp_path / f"chunk{k}{ext}", "--algo", algo, "--processes", "2", *seeds,
                    "--seed_range", str(a), str(b)) for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    merged = tmp_path / f"merged{ext}"
    merge_main([str(merged), *map(str, chunks)])
    if ext == ".trx":  # a zip: compare the arrays
        a, b = tmm.load(str(whole)), tmm.load(str(merged))
        assert np.array_equal(a.streamlines._data, b.streamlines._data)
        assert np.array_equal(a.streamlines._lengths, b.streamlines._lengths)
        assert np.array_equal(a.data_per_streamline["seeds"], b.data_per_streamline["seeds"])
        assert len(a) > 20
        a.close(), b.close()
    else:
        assert merged.read_bytes() == whole.read_bytes()
        assert len(nib.streamlines.load(str(whole)).streamlines) > 20


def test_merge_refuses_another_reference_and_writes_nothing(experiment, tmp_path):
    chunk = track(experiment, tmp_path / "chunk.trk", "--seed_range", "0", "20")
    other = tmp_path / "other.trk"
    save_tractogram_file(other, [np.array([[1.0, 1, 1], [2, 2, 2]], np.float32)],
                         nib.Nifti1Image(np.zeros((5, 5, 5), np.float32), np.diag([2.0, 2, 2, 1])))
    out = tmp_path / "merged.trk"
    with pytest.raises(SystemExit) as exit_info:
        merge_main([str(out), str(chunk), str(other)])
    assert exit_info.value.code == 2 and not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--seed_range", "30", "41"], "past the run's 40 seeds"),
    (["--seed_range", "5", "5"], "START < END"),
    (["--processes", "2", "--use_gpu"], "--processes is for CPU tracking"),
])
def test_bad_seed_range_or_processes_is_one_error_line(experiment, tmp_path, capsys, extra, message):
    out = tmp_path / "out.trk"
    with pytest.raises(SystemExit) as exit_info:
        track(experiment, out, *extra)
    assert exit_info.value.code == 2 and not out.exists()
    assert message in capsys.readouterr().err
