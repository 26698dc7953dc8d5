"""Model components; importing this package registers the built-in ones."""

from seedbed.model.lm import LM, count_parameters, effective_parameters, virtual_parameters

__all__ = ["LM", "count_parameters", "effective_parameters", "virtual_parameters"]
