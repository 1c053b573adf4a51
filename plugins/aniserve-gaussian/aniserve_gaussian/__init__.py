"""A Gaussian radial-basis featurizer with learned species embeddings, for aniserve."""

from aniserve_gaussian.featurizer import GaussianEmbeddingFeaturizer

__all__ = ["GaussianEmbeddingFeaturizer"]
