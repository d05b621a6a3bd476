"""Join the tractograms of consecutive seed ranges (``--seed_range`` chunks) into the whole run's tractogram.

Chunks are concatenated in the given order without re-reading their coordinates: a .trk or .tck body is
copied byte for byte under the first chunk's header (streamline count updated), so the merged file is the
one an unchunked run writes, bit for bit; .trx chunks are joined with trx-python. Every chunk must share the
output's format and the first chunk's header (same reference grid), else nothing is written.
"""

import logging
import struct
from pathlib import Path

import numpy as np

from trackflow.data.tractograms import TRACTOGRAM_EXTENSIONS
from trackflow.errors import TrackflowError
from trackflow.files import atomic_output, check_outputs

LOGGER = logging.getLogger(__name__)

TRK_HEADER_SIZE = 1000
TRK_COUNT = slice(988, 992)  # int32 n_count in the TrackVis header
TRK_N_SCALARS = slice(36, 38)  # int16 n_scalars (values per point after x, y, z)
TRK_N_PROPERTIES = slice(238, 240)  # int16 n_properties (values per streamline)
TCK_END = np.full(3, np.inf, "<f4").tobytes()  # the point that ends a .tck body


def merge_tractograms(out_path, in_paths: list, overwrite: bool = False) -> int:
    """Write ``out_path``, the streamlines of ``in_paths`` one file after the other; returns their count."""
    out_path, in_paths = Path(out_path), [Path(p) for p in in_paths]
    suffix = out_path.suffix.lower()
    if suffix not in TRACTOGRAM_EXTENSIONS:
        raise TrackflowError(f"output tractogram {out_path} must end in .trk, .tck or .trx")
    if not in_paths:
        raise TrackflowError("no tractogram to merge")
    for path in in_paths:
        if not path.is_file():
            raise TrackflowError(f"tractogram {path} does not exist")
        if path.suffix.lower() != suffix:
            raise TrackflowError(f"{path} is not a {suffix} file like the output {out_path}")
    check_outputs([out_path], overwrite, inputs=in_paths)
    if suffix == ".trx":
        return _merge_trx(out_path, in_paths)
    split = _split_trk if suffix == ".trk" else _split_tck
    parts = [split(path) for path in in_paths]  # (header, count, body)
    header = parts[0][0]
    for path, (other, _, _) in zip(in_paths[1:], parts[1:]):
        if other != header:
            raise TrackflowError(f"{path} does not have the header of {in_paths[0]} (another reference "
                                 "image or format options): not merged")
    count = sum(n for _, n, _ in parts)
    with atomic_output(out_path) as tmp, open(tmp, "wb") as f:
        f.write(_trk_header(header, count) if suffix == ".trk" else _tck_header(header, count))
        f.writelines(body for _, _, body in parts)
        if suffix == ".tck":
            f.write(TCK_END)
    LOGGER.info("wrote %s (%d streamlines from %d files)", out_path, count, len(in_paths))
    return count


def _split_trk(path: Path) -> tuple:
    """(header with a zero count, count, body) of a .trk file."""
    data = path.read_bytes()
    if len(data) < TRK_HEADER_SIZE or data[:5] != b"TRACK":
        raise TrackflowError(f"{path} is not a TrackVis .trk file")
    header = bytearray(data[:TRK_HEADER_SIZE])
    (count,) = struct.unpack("<i", header[TRK_COUNT])
    header[TRK_COUNT] = bytes(4)
    body = data[TRK_HEADER_SIZE:]
    _check_trk_body(path, header, count, body)
    return bytes(header), count, body


def _check_trk_body(path: Path, header: bytes, count: int, body: bytes) -> None:
    """The body must hold exactly ``count`` streamlines (a truncated chunk would be copied as is)."""
    (n_scalars,) = struct.unpack("<h", header[TRK_N_SCALARS])
    (n_properties,) = struct.unpack("<h", header[TRK_N_PROPERTIES])
    offset = 0
    for _ in range(count):
        if offset + 4 > len(body):
            break
        (n_points,) = struct.unpack_from("<i", body, offset)
        if n_points < 0:
            break
        offset += 4 + 4 * (n_points * (3 + n_scalars) + n_properties)
    else:
        if offset == len(body):
            return
    raise TrackflowError(f"{path} is truncated or damaged: its body does not hold the {count} streamlines "
                         "of its header")


def _trk_header(header: bytes, count: int) -> bytes:
    header = bytearray(header)
    header[TRK_COUNT] = struct.pack("<i", count)
    return bytes(header)


def _split_tck(path: Path) -> tuple:
    """(header lines without the count, count, body without its end point) of a .tck file as nibabel writes
    it (a fixed-width count)."""
    data = path.read_bytes()
    end = data.find(b"\nEND\n")
    if not data.startswith(b"mrtrix tracks\n") or end < 0:
        raise TrackflowError(f"{path} is not an MRtrix .tck file")
    lines = data[:end].decode("latin-1").split("\n")
    counts = [line for line in lines if line.startswith("count: ")]
    offsets = [line for line in lines if line.startswith("file: . ")]
    if len(counts) != 1 or len(offsets) != 1 or not data.endswith(TCK_END):
        raise TrackflowError(f"{path}: unexpected .tck layout (not written by trackflow)")
    body_start = int(offsets[0].split()[-1])
    header = tuple(line if line not in counts else f"count: {'#' * (len(line) - 7)}" for line in lines)
    return header + (data[end:body_start].decode("latin-1"),), int(counts[0][7:]), data[body_start:-len(TCK_END)]


def _tck_header(header: tuple, count: int) -> bytes:
    lines = list(header)
    width = next(line for line in lines if line.startswith("count: ")).count("#")
    if len(str(count)) > width:
        raise TrackflowError(f"{count} streamlines do not fit the .tck header's count field")
    lines = [f"count: {count:0{width}d}" if line.startswith("count: ") else line for line in lines]
    return ("\n".join(lines[:-1]) + lines[-1]).encode("latin-1")


def _merge_trx(out_path: Path, in_paths: list) -> int:
    import trx.trx_file_memmap as tmm
    chunks = []
    for path in in_paths:
        try:
            chunks.append(tmm.load(str(path)))
        except Exception as e:  # zipfile, numpy and json raise many types for damaged archives
            raise TrackflowError(f"cannot read tractogram {path}: {e}") from None
    try:
        first = chunks[0].header
        for path, chunk in zip(in_paths[1:], chunks[1:]):
            if not (np.allclose(chunk.header["VOXEL_TO_RASMM"], first["VOXEL_TO_RASMM"])
                    and np.array_equal(chunk.header["DIMENSIONS"], first["DIMENSIONS"])):
                raise TrackflowError(f"{path} does not have the reference of {in_paths[0]}: not merged")
        merged = tmm.concatenate(chunks, preallocation=False)
        count = len(merged)
        with atomic_output(out_path) as tmp:
            tmm.save(merged, str(tmp))
        merged.close()
    finally:
        for chunk in chunks:
            chunk.close()
    LOGGER.info("wrote %s (%d streamlines from %d files)", out_path, count, len(in_paths))
    return count
