"""Sampled attention (`WTACRSConfig.attention`): the score (QKᵀ) and output (P·V) matmuls of
attention estimated from sampled slices, below `modeling` in the layers.

- `ops`: the sampled batched matmul (autograd op, no model knowledge).
- `transformers`: the "wtacrs" attention function registered with Hugging Face transformers'
  attention interface, which `wtacrs.apply` switches a model to (imported lazily: transformers
  is optional).
"""
