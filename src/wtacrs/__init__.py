"""wtacrs: memory-efficient fine-tuning with Winner-Take-All Column-Row Sampling.

Liu et al., "Winner-Take-All Column Row Sampling for Memory Efficient Adaptation of Language
Model", NeurIPS 2023, arXiv:2305.15265.
"""

__version__ = "0.1.0"
