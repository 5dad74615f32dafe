"""Mixture-of-experts layers: top-k routing, the experts' stacked weights and their kernels."""
