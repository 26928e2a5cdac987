"""Training objectives as plain PyTorch functions of a flow and a batch (no Lightning): conditional
flow matching for continuous flows and reverse-KL (variational) fitting of an unnormalised density.
The Lightning module in :mod:`flowforge.training` only calls them."""
