"""Model directories in dwi_ml's format: ``parameters.json``, ``model_type.txt``, ``model_state.pkl``.

dwi_ml reads the folders we write and we read dwi_ml's, including the legacy names its own "update
deprecated experiment" scripts rewrite (``dwi_ml-checkpoints.md`` §1.6).
"""

import json
from pathlib import Path

import torch

from trackflow.errors import TrackflowError
from trackflow.files import atomic_directory
from trackflow.models.registry import MODEL_TYPE_FILE, model_class

PARAMETERS_FILE = "parameters.json"
STATE_FILE = "model_state.pkl"

_RENAMED_PARAMS = {
    "prev_dirs_embedding_size": "prev_dirs_embedded_size",
    "input_embedding_size": "input_embedded_size",
    "embedding_key_x": "input_embedding_key",
    "d_model": "input_embedded_size",
}
_REMOVED_PARAMS = ("start_from_copy_prev", "input_embedding_size_ratio")
_REMOVED_DG_ARGS = ("compress_loss", "compress_eps", "weight_loss_with_angle")
_RENAMED_STATE_PREFIXES = {
    "input_embedding.": "input_embedding_layer.",
    "embedding_layer_x.": "input_embedding_layer.",
}


def upgrade_legacy_params(params: dict) -> dict:
    """Map the parameter names of older dwi_ml versions to the current ones (returns a new dict)."""
    params = dict(params)
    for old, new in _RENAMED_PARAMS.items():
        if old in params:
            value = params.pop(old)
            params.setdefault(new, value)
    for removed in _REMOVED_PARAMS:
        if params.pop(removed, None) not in (None, False):
            raise TrackflowError(f"legacy parameter {removed} is set, which current models do not support")
    radius = params.get("neighborhood_radius")
    if isinstance(radius, list):
        # Old format: the list of ring distances, equally spaced (r1, 2*r1, ...).
        expected = [radius[0] * (k + 1) for k in range(len(radius))]
        if not radius or any(abs(a - b) > 1e-6 * abs(b) for a, b in zip(radius, expected)):
            raise TrackflowError(f"legacy neighborhood_radius {radius} is not equally spaced")
        params["neighborhood_radius"] = len(radius)
        params["neighborhood_resolution"] = radius[0]
    if isinstance(params.get("dg_args"), dict):
        params["dg_args"] = {k: v for k, v in params["dg_args"].items() if k not in _REMOVED_DG_ARGS}
    params.setdefault("nb_cnn_filters", None)
    params.setdefault("kernel_size", None)
    return params


def upgrade_legacy_state_dict(state_dict: dict) -> dict:
    """Rename the state-dict keys of older dwi_ml versions (returns a new dict)."""
    upgraded = {}
    for key, value in state_dict.items():
        for old, new in _RENAMED_STATE_PREFIXES.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        upgraded[key] = value
    return upgraded


def save_model_dir(model, path) -> None:
    """Write ``model`` as a dwi_ml-format model directory (replaces ``path`` if it exists).

    The files are written into a temporary sibling folder that is renamed to ``path`` only when
    complete, so an interrupted save never leaves a half-written model under the final name.
    """
    with atomic_directory(path) as tmp_dir:
        with open(tmp_dir / PARAMETERS_FILE, "w") as f:
            json.dump(model.params_for_checkpoint(), f, indent=4)
        (tmp_dir / MODEL_TYPE_FILE).write_text(type(model).__name__)
        torch.save(model.state_dict(), tmp_dir / STATE_FILE)


def _read_model_type(path: Path) -> str:
    try:
        return (path / MODEL_TYPE_FILE).read_text().strip()
    except FileNotFoundError:
        raise TrackflowError(f"model folder {path} has no {MODEL_TYPE_FILE}") from None
    except UnicodeDecodeError:
        raise TrackflowError(f"{path / MODEL_TYPE_FILE} is not a text file") from None


def _read_params(path: Path) -> dict:
    file = path / PARAMETERS_FILE
    try:
        with open(file) as f:
            params = json.load(f)  # Python's json accepts dwi_ml's Infinity / NaN
    except FileNotFoundError:
        raise TrackflowError(f"model folder {path} has no {PARAMETERS_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrackflowError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(params, dict):
        raise TrackflowError(f"{file} does not hold a JSON object")
    return params


def load_torch_file(file: Path, device, what: str):
    """``torch.load(..., weights_only=True)`` of an untrusted file; any failure is one TrackflowError.

    weights_only never runs code, but damaged or hostile bytes raise a dozen exception types (EOFError,
    RuntimeError, OSError, UnpicklingError, struct.error, UnicodeDecodeError, ...): all mean "not readable".
    """
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - see above
        reason = (str(e).strip().splitlines() or [""])[0][:120]
        raise TrackflowError(f"{file} is not a readable {what} ({type(e).__name__}: {reason})") from None


def _read_state_dict(path: Path, device) -> dict:
    file = path / STATE_FILE
    if not file.is_file():
        raise TrackflowError(f"model folder {path} has no {STATE_FILE}")
    state_dict = load_torch_file(file, device, "torch state dict")
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise TrackflowError(f"{file} does not hold a plain state dict of tensors")
    return state_dict


def _check_state_dict_matches(model, state_dict: dict, file: Path) -> None:
    """Refuse a state dict whose keys or shapes differ from the model's, in one sentence."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(f"{k} {list(state_dict[k].shape)} vs {list(expected[k].shape)}"
                        for k in set(expected) & set(state_dict) if state_dict[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        problems = [f"{name} {items[:5]}{' ...' if len(items) > 5 else ''}"
                    for name, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                        ("shape mismatches", mismatched)) if items]
        raise TrackflowError(f"{file} does not match the model described by {PARAMETERS_FILE}: "
                             + "; ".join(problems))


def load_model_dir(path, device="cpu"):
    """Load a model directory written by trackflow or dwi_ml.

    Parameters
    ----------
    path : str or Path
        Folder holding ``parameters.json``, ``model_type.txt`` and ``model_state.pkl``.
    device : str or torch.device

    Returns
    -------
    MainModel
        On ``device``, in eval mode.
    """
    path = Path(path)
    if not path.is_dir():
        raise TrackflowError(f"model folder {path} does not exist")
    cls = model_class(_read_model_type(path))
    params = upgrade_legacy_params(_read_params(path))
    state_dict = upgrade_legacy_state_dict(_read_state_dict(path, device))
    state_dict = cls.convert_loaded_state_dict(state_dict, params)
    model = cls(**params)
    _check_state_dict_matches(model, state_dict, path / STATE_FILE)
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval()


def load_experiment_model(experiment_dir, use_latest_epoch=False, device="cpu"):
    """Load the model of a training experiment folder (spec §5.5).

    Parameters
    ----------
    experiment_dir : str or Path
    use_latest_epoch : bool
        Load ``checkpoint/model/`` (latest epoch) instead of ``best_model/``.
    device : str or torch.device

    Returns
    -------
    MainModel
        In eval mode.
    """
    experiment_dir = Path(experiment_dir)
    if not experiment_dir.is_dir():
        raise TrackflowError(f"experiment folder {experiment_dir} does not exist")
    if use_latest_epoch:
        model_dir = experiment_dir / "checkpoint" / "model"
        if not model_dir.is_dir():
            raise TrackflowError(f"experiment folder {experiment_dir} has no checkpoint/model/ folder")
    else:
        model_dir = experiment_dir / "best_model"
        if not model_dir.is_dir():
            raise TrackflowError(f"experiment folder {experiment_dir} has no best_model/ folder "
                                 "(not a trained experiment?)")
    return load_model_dir(model_dir, device)
