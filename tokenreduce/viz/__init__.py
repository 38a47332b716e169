"""Pictures of token reduction: merge maps over the input images, accuracy-against-cost plots.

Figures are built on matplotlib's non-interactive Agg canvas and returned; nothing is shown.
"""

from tokenreduce.viz.merge_maps import merge_maps, palette, patch_colours, token_grid
from tokenreduce.viz.tradeoff import plot_tradeoff

__all__ = ["merge_maps", "palette", "patch_colours", "plot_tradeoff", "token_grid"]
