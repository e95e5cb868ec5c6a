"""Taking a model out of the project.

reference  `cltdr export-torch`: a checkpoint in the authors' PyTorch format (the inverse of `cltdr convert`)
programs   `cltdr export`: the network and decoding as serialized XLA programs (jax.export, StableHLO),
           one per padded length, and the predictor that runs them without the Flax model
"""
