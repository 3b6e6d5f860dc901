"""Tools on whole models: Algorithm 2 as a procedure (convert, convert_sync, and more to come)."""

from .convert import bn_layers, convert, name_layers
from .sync import convert_from_sync, convert_sync

__all__ = ["bn_layers", "convert", "convert_from_sync", "convert_sync", "name_layers"]
