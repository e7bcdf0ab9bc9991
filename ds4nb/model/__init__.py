"""DS4 GGUF files: configuration, tensor schema and catalog, loading, synthetic models."""

from ds4nb.model.catalog import Role, TensorSpec, expected_tensors
from ds4nb.model.config import ARCH, METADATA_KEYS, ModelConfig, config_from_metadata
from ds4nb.model.loader import LayerWeights, Model, MtpWeights, TensorInfo, Weights, load_model

__all__ = [
    "ARCH", "METADATA_KEYS", "LayerWeights", "Model", "ModelConfig", "MtpWeights", "Role",
    "TensorInfo", "TensorSpec", "Weights", "config_from_metadata", "expected_tensors", "load_model",
]
