"""Example LightningModules and DataModules for the examples and the YAML configs.

They live in the package so that ``class_path: pf_lightning.demos.DigitsMLP`` resolves after
``pip install``. Each is small and runs on a CPU in minutes.
"""

from .console import MeasurementTable, edge_summary
from .digits import DigitsDataModule, DigitsMLP, OptimizerFactory, load_digits_tensors, tensor_loader
from .language import MarkovSequenceDataModule, TinyTransformerLM

__all__ = [
    "DigitsDataModule",
    "DigitsMLP",
    "MarkovSequenceDataModule",
    "MeasurementTable",
    "OptimizerFactory",
    "TinyTransformerLM",
    "edge_summary",
    "load_digits_tensors",
    "tensor_loader",
]
