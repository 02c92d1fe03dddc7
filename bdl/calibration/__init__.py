"""Post-hoc calibration: fixes applied to a trained model's outputs (or predictions) without retraining it."""

from .temperature import TemperatureScaledModel, TemperatureScaler, fit_temperature
from .variance import VarianceScaler, fit_variance_scale

__all__ = [
    "TemperatureScaledModel",
    "TemperatureScaler",
    "VarianceScaler",
    "fit_temperature",
    "fit_variance_scale",
]
