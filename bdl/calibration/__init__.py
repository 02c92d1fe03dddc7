"""Post-hoc calibration: fixes applied to a trained model's outputs without retraining it."""

from .temperature import TemperatureScaledModel, TemperatureScaler, fit_temperature

__all__ = [
    "TemperatureScaledModel",
    "TemperatureScaler",
    "fit_temperature",
]
