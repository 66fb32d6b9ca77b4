"""The per-model sampling state of the sampled layers, one unit a file.

- `context`: the current `wtacrs.batch` block (example ids, host mask).
- `rows`: which rows of a forward are which examples' tokens (`RowLayouts`, `ForwardRows`).
- `draws`: one sample per tensor (`DrawRegistry`), this step's counter-based uniforms
  (`StepUniforms`), the budget k.
- `norms`: cached ‖dY‖ → each slot's score multipliers for a forward (`NormReader`).
- `recorder`: backward's ‖dY‖ collected and shipped off the device, with the padding flag
  (`StepRecorder`, `ShippedStep`, `PaddingGradientError`).
- `fold`: shipped steps written into the gradient-norm cache, exchanged across ranks (`NormFolder`).
- `plan`: the host work of a compiled step done before it (`StepPlan`).
- `state`: `SamplingState`, composing them; the entry points of the layers, `wtacrs.batch`,
  `wtacrs.apply` and the integrations.
- `transport`: host ↔ device copies that never make the device wait.
"""

from wtacrs.sampling.context import BatchContext
from wtacrs.sampling.recorder import PaddingGradientError
from wtacrs.sampling.state import SamplingState

__all__ = ["BatchContext", "PaddingGradientError", "SamplingState"]
