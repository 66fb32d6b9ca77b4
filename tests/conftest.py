import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # the shared `stats` and `models` helpers

# The suite's models are tiny: thread start-up and contention cost more than a second thread
# gains (a tiny T5 step measured 4.3 s with 2 threads on a busy 2-core machine, 0.1 s with 1).
torch.set_num_threads(1)
