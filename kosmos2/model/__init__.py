from .kosmos2 import Kosmos2Model, build_model
from .kv_cache import KVCache

__all__ = ["Kosmos2Model", "build_model", "KVCache"]
