"""The hdf5 groups config (dwi_ml spec §1.3): JSON reading and validation.

The config maps each hdf5 group name to ``{"type": "volume"|"streamlines", "files": ..., ...}``.
dwi_ml's own documentation ships a config ending in a trailing comma (``}, }``) that dwi_ml rejects;
we accept trailing commas and report any other JSON error with its line and column.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from trackflow.errors import TrackflowError

STANDARDIZATION_MODES = ("all", "independent", "per_file", "none")

_COMMON_KEYS = {"type", "files"}
_VOLUME_KEYS = _COMMON_KEYS | {"standardization", "std_mask"}
_STREAMLINE_KEYS = _COMMON_KEYS | {"dps_keys", "connectivity_matrix", "connectivity_nb_blocs",
                                   "connectivity_labels"}

# A JSON string literal, or a comma followed (after blanks) by a closing bracket.
_STRING_OR_TRAILING_COMMA = re.compile(r'"(?:[^"\\]|\\.)*"|,(?=\s*[}\]])')


@dataclass(frozen=True)
class VolumeGroupConfig:
    """One volume group: its files (globs, relative to the subject folder) are concatenated on F."""

    name: str
    files: tuple[str, ...]
    standardization: str
    std_mask: tuple[str, ...] = ()


@dataclass(frozen=True)
class StreamlineGroupConfig:
    """One streamline group: the union of its tractograms, with the kept data_per_streamline keys.

    Connectivity (optional): ``connectivity_matrix`` (a .npy path) with exactly one of
    ``connectivity_nb_blocs`` (3 ints) or ``connectivity_labels`` (a label NIfTI path).
    """

    name: str
    files: tuple[str, ...]
    dps_keys: tuple[str, ...] = ()
    connectivity_matrix: str | None = None
    connectivity_nb_blocs: tuple[int, int, int] | None = None
    connectivity_labels: str | None = None


GroupConfig = VolumeGroupConfig | StreamlineGroupConfig


def loads_json_allowing_trailing_commas(text: str, source: str = "<string>"):
    """Parse JSON text, accepting trailing commas before ``}`` or ``]``.

    Trailing commas are replaced by a blank (not removed) so that the line and column of any other
    error still point into the user's file.
    """
    cleaned = _STRING_OR_TRAILING_COMMA.sub(
        lambda m: " " if m.group(0) == "," else m.group(0), text)
    try:
        return json.loads(cleaned)
    except json.JSONDecodeError as e:
        raise TrackflowError(f"{source} is not valid JSON: {e.msg} at line {e.lineno}, "
                             f"column {e.colno}") from None


def _as_str_tuple(value, what: str) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v
                                                             for v in values):
        raise TrackflowError(f"{what} must be a non-empty string or list of strings, got {value!r}")
    return tuple(values)


def _nb_blocs(value, group: str) -> tuple[int, int, int]:
    # dwi_ml: an int n means [n, n, n]; a one-element list is unwrapped.
    values = value if isinstance(value, list) else [value]
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                   for v in values):
        raise TrackflowError(f"group '{group}': connectivity_nb_blocs must be a positive int or a "
                             f"list of 3 positive ints, got {value!r}")
    return tuple(values)


def _parse_group(name: str, spec) -> GroupConfig:
    if not isinstance(spec, dict):
        raise TrackflowError(f"group '{name}' must be a JSON object, got {type(spec).__name__}")
    group_type = spec.get("type")
    if group_type not in ("volume", "streamlines"):
        raise TrackflowError(f"group '{name}' has unknown type {group_type!r} "
                             "(expected 'volume' or 'streamlines')")
    if "files" not in spec:
        raise TrackflowError(f"group '{name}' has no 'files'")
    files = _as_str_tuple(spec["files"], f"group '{name}': files")
    allowed = _VOLUME_KEYS if group_type == "volume" else _STREAMLINE_KEYS
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise TrackflowError(f"group '{name}' ({group_type}) has unknown key(s) {unknown}; "
                             f"allowed: {sorted(allowed)}")

    if group_type == "volume":
        if "standardization" not in spec:
            raise TrackflowError(f"volume group '{name}' needs 'standardization', one of "
                                 f"{list(STANDARDIZATION_MODES)}")
        mode = spec["standardization"]
        if mode not in STANDARDIZATION_MODES:
            raise TrackflowError(f"volume group '{name}' has invalid standardization {mode!r}, "
                                 f"expected one of {list(STANDARDIZATION_MODES)}")
        std_mask = _as_str_tuple(spec["std_mask"], f"group '{name}': std_mask") \
            if "std_mask" in spec else ()
        return VolumeGroupConfig(name, files, mode, std_mask)

    dps_keys = _as_str_tuple(spec["dps_keys"], f"group '{name}': dps_keys") \
        if "dps_keys" in spec else ()
    matrix = spec.get("connectivity_matrix")
    has_blocs, has_labels = "connectivity_nb_blocs" in spec, "connectivity_labels" in spec
    if matrix is None and (has_blocs or has_labels):
        raise TrackflowError(f"group '{name}': connectivity_nb_blocs/connectivity_labels need "
                             "connectivity_matrix")
    if matrix is not None:
        _as_str_tuple(matrix, f"group '{name}': connectivity_matrix")
        if has_blocs == has_labels:
            raise TrackflowError(f"group '{name}': connectivity_matrix needs exactly one of "
                                 "connectivity_nb_blocs or connectivity_labels")
    labels = spec.get("connectivity_labels")
    if labels is not None:
        _as_str_tuple(labels, f"group '{name}': connectivity_labels")
    blocs = _nb_blocs(spec["connectivity_nb_blocs"], name) if has_blocs else None
    return StreamlineGroupConfig(name, files, dps_keys, matrix, blocs, labels)


def parse_groups_config(raw) -> list[GroupConfig]:
    """Validate a parsed config dict; return its groups in config order."""
    if not isinstance(raw, dict) or not raw:
        raise TrackflowError("the groups config must be a non-empty JSON object of groups")
    return [_parse_group(name, spec) for name, spec in raw.items()]


def read_groups_config(path) -> tuple[dict, list[GroupConfig]]:
    """Read and validate a groups config file.

    Returns
    -------
    raw : dict
        The parsed JSON (stored as ``str(raw)`` in the hdf5 root attribute ``groups_config``).
    groups : list of VolumeGroupConfig | StreamlineGroupConfig
        In config order.
    """
    path = Path(path)
    if not path.is_file():
        raise TrackflowError(f"config file {path} does not exist")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise TrackflowError(f"config file {path} is not a text (JSON) file") from None
    raw = loads_json_allowing_trailing_commas(text, source=str(path))
    return raw, parse_groups_config(raw)


def file_patterns(group: GroupConfig) -> tuple[str, ...]:
    """Every path pattern a group needs in each subject folder (for the presence check)."""
    if isinstance(group, VolumeGroupConfig):
        return group.files + group.std_mask
    extra = tuple(p for p in (group.connectivity_matrix, group.connectivity_labels) if p)
    return group.files + extra
