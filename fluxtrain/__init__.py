"""fluxtrain: a PyTorch-native trainer for FLUX.1-dev-class rectified-flow transformers."""

__version__ = "0.1.0"
