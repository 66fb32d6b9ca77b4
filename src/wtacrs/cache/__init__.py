"""Gradient-norm cache: ‖dY_i‖ from an example's previous visit, for the scores ‖X_i‖·‖dY_i‖.

The optimal CRS distribution needs the output-gradient norms, which forward does not know.
Liu et al. (2023, Sec. 4) reuse the norms recorded when the same training example last passed
through the layer. Stale or missing norms only change the sampling distribution, and every
estimator stays unbiased for any positive distribution (see `estimators.column_row_scores`).

One unit a file:
- `store.NormStore`: the log-scale uint8 codes by (example id, real-token ordinal, slot), and
  their encoding (`encode_norms`, `decode_norms`).
- `prior.PositionPrior`: per slot and position, a moving average of recent norms, the scores of
  examples not seen yet.
- `records.PendingRecord`: one layer's norms of one step, typed, on their way to a commit.
- `norm_cache.GradNormCache`: the cache the sampler reads and writes: lookups as of the last
  commit, answered by the store and, for unseen examples, the prior; records buffered until commit.
"""

from wtacrs.cache.norm_cache import GradNormCache
from wtacrs.cache.prior import PRIOR_DECAY, PositionPrior
from wtacrs.cache.records import PendingRecord
from wtacrs.cache.store import NormStore, decode_norms, encode_norms

__all__ = ["GradNormCache", "NormStore", "PendingRecord", "PositionPrior", "PRIOR_DECAY", "decode_norms",
           "encode_norms"]
