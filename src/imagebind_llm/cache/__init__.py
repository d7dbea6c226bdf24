"""The training-free visual cache of ImageBind-LLM: a FAISS index of image features and the blend.

API summary::

    from imagebind_llm.cache import BlendOptions, FeatureCache, build_cache

    cache = FeatureCache.from_vectors(feats)             # [n, D] unit-norm, in memory
    cache = FeatureCache.load("cache/")                  # memory-mapped, sizes/checksums verified
    cache.check_compatible(dim=1024, encoder="imagebind_huge")
    sims, ids = cache.search(q, top_k=10)                # [B, k] each
    q2 = cache.blend(q, BlendOptions(top_k=5))           # unset fields: the cache's stored defaults (10, 20, 0.5)
    cache.nprobe = 64                                    # IVF lists searched
    extract_image_features(paths, "feats/", imagebind="imagebind_huge.pth")         # resumable shards
    FeatureStore("feats/")[i]                            # row i, memory-mapped (training reads these)
    build_cache("cache/", encoder="imagebind_huge", images=paths, encode_images=fn)   # resumable, sharded
    build_cache("cache/", encoder="imagebind_huge", features=["a.npy", "b.npy"])
    build_cache("cache/", encoder="imagebind_huge", faiss_index="knn.index")         # the official index
"""

from .build import build_cache, build_from_images, build_from_shards, import_faiss_index, merge_shards
from .blend import OFFICIAL_BLEND, BlendOptions, ExactBank, FeatureRetriever, blend_neighbours
from .feature_cache import CacheError, CacheMeta, FeatureCache
from .index import choose_factory, default_nlist
from .shards import FeatureStore, extract_features, extract_image_features

__all__ = [
    "OFFICIAL_BLEND", "BlendOptions", "CacheError", "CacheMeta", "ExactBank", "FeatureCache", "FeatureRetriever",
    "blend_neighbours", "build_cache", "build_from_images", "build_from_shards", "choose_factory", "default_nlist",
    "FeatureStore", "extract_features", "extract_image_features", "import_faiss_index", "merge_shards",
]
