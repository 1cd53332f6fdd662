"""One saliency implementation for every method: gradient statistics and masks."""

from erase.saliency.masks import density, density_report, load_masks, save_masks, threshold_masks, topk_masks
from erase.saliency.stats import gradient_statistics

__all__ = ["density", "density_report", "gradient_statistics", "load_masks", "save_masks", "threshold_masks", "topk_masks"]
