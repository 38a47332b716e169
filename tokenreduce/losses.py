"""Training losses that belong to a reduction method, for a training loop to call; each lives with
its method and is gathered here.

- `mctf_consistency_loss(model, images, targets)`: MCTF's token-reduction consistency step (runs
  the model twice and returns the whole loss); `mctf_consistency_terms` is its teacher half, for a
  loop that already ran the student pass (the engine's `MCTF.training_losses`).
- `dynamicvit_ratio_loss(model)`: DynamicViT's keep-ratio loss of the model's last training pass.
"""

from tokenreduce.reducers.dynamicvit import dynamicvit_ratio_loss
from tokenreduce.reducers.mctf import draw_teacher_r, mctf_consistency_loss, mctf_consistency_terms

__all__ = ["draw_teacher_r", "dynamicvit_ratio_loss", "mctf_consistency_loss", "mctf_consistency_terms"]
