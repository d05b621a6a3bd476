"""The model vocabulary: every model class by its ``model_type.txt`` name, and the family that reads it.

Learn2track experiments are read by the ``l2t_*`` scripts, TractoTransformers by the ``tt_*`` ones; the
transformer variants are also named by their short ``--model`` names (TTO, TTS, TTST).
"""

import importlib

from trackflow.errors import TrackflowError

MODEL_TYPE_FILE = "model_type.txt"

L2T_MODEL_TYPES = ("Learn2TrackModel",)
# ``tt_train_model --model`` name -> class name.
TT_MODEL_TYPES = {"TTO": "OriginalTransformerModel", "TTS": "TransformerSrcOnlyModel",
                  "TTST": "TransformerSrcAndTgtModel"}

# Class name -> module defining it (imported on demand).
MODEL_MODULES = {
    **{name: "trackflow.models.l2t" for name in L2T_MODEL_TYPES},
    **{name: "trackflow.models.transformers" for name in TT_MODEL_TYPES.values()},
}


def model_class(model_type: str):
    """The model class named in ``model_type.txt``.

    Modules are imported on demand, so Learn2track folders load whatever the state of the transformer
    module.
    """
    if model_type not in MODEL_MODULES:
        raise TrackflowError(f"unknown model type {model_type!r} in {MODEL_TYPE_FILE}; expected one of "
                             f"{sorted(MODEL_MODULES)}")
    return getattr(importlib.import_module(MODEL_MODULES[model_type]), model_type)


def model_family(model_type: str) -> str:
    """``"l2t"`` or ``"tt"``: the family of scripts that reads a model of this class."""
    return "l2t" if model_type in L2T_MODEL_TYPES else "tt"


def check_model_family(model_type: str, expected_family: str, script: str) -> None:
    """Refuse a model of the other family, naming the script that reads it.

    Parameters
    ----------
    model_type : str
        Class name of the experiment's model (``type(model).__name__`` or ``model_type.txt``).
    expected_family : str
        ``"l2t"`` or ``"tt"``: the family of the script that was run.
    script : str
        The script's name without its family prefix, e.g. ``"track_from_model"``.
    """
    family = model_family(model_type)
    if family != expected_family:
        raise TrackflowError(f"this experiment holds a {model_type}: use {family}_{script}")
