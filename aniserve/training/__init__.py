"""Training and transfer learning: ANI HDF5 data, the trainer, built-in strategies."""

from aniserve.training.architecture import (
    continue_transfer,
    default_description,
    description_for,
    new_model,
    transfer_model,
)
from aniserve.training.data import ANIData, DataError
from aniserve.training.trainer import Settings, train

__all__ = [
    "ANIData",
    "DataError",
    "Settings",
    "continue_transfer",
    "default_description",
    "description_for",
    "new_model",
    "train",
    "transfer_model",
]
