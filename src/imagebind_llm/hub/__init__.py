"""The bottom layer: the registry of official files and named models, downloads, the cache folder and
the one state-dict reader. Any package may import it; it imports no other package of ours."""

from .download import CACHE_ENV, ChecksumError, DownloadError, default_cache_dir, fetch, format_weights_table, sha256_file
from .registry import DEMO_DIR, DEMO_INSTALLED, DEMO_NOTE, MODELS, REGISTRY, NamedModel, WeightFile, list_weights
from .state_dict import StateDictError, read_state_dict

__all__ = [
    "CACHE_ENV", "ChecksumError", "DEMO_DIR", "DEMO_INSTALLED", "DEMO_NOTE", "DownloadError", "MODELS", "NamedModel",
    "REGISTRY", "StateDictError", "WeightFile",
    "default_cache_dir", "fetch", "format_weights_table", "list_weights", "read_state_dict", "sha256_file",
]
