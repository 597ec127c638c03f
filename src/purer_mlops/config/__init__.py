"""``params.yaml`` → one typed, validated :class:`Params` object.

:mod:`.params` declares every knob once (:mod:`.knobs`); :mod:`.loading` reads and
validates the file; :mod:`.derived` derives the stage lists, the fingerprint's knobs and
``docs/parameters.md`` from the declarations.
"""

from .knobs import ConfigError
from .loading import from_dict, load_params
from .params import BACKBONES, META_LEARNERS, METHODS, CalibrationParams, InversionParams, Params, PretrainParams

__all__ = ["BACKBONES", "META_LEARNERS", "METHODS", "CalibrationParams", "ConfigError", "InversionParams",
           "Params", "PretrainParams", "from_dict", "load_params"]
