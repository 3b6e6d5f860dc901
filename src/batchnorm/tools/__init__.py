"""Tools on whole models: Algorithm 2 as a procedure (convert, and more to come)."""

from .convert import bn_layers, convert, name_layers

__all__ = ["bn_layers", "convert", "name_layers"]
