"""Registers the featurizer with aniserve (entry point ``gaussian`` in group ``aniserve``)."""

from aniserve import hookimpl


@hookimpl
def aniserve_featurizers():
    from aniserve_gaussian.featurizer import GaussianEmbeddingFeaturizer

    return {"gaussian-embedding": GaussianEmbeddingFeaturizer}
