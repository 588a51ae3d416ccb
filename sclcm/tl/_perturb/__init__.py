"""In-silico perturbation (``sclcm.tl.perturb``): the tool, the token edits it makes, the
batched scoring of edited cells, the statistics against a matched null, and the checks of
what users ask to perturb."""

from ._tool import perturb

__all__ = ["perturb"]
