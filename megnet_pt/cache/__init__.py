"""HDF5 graph cache: crystal graphs built once, read back fast.

    format.py   the file layout (and what must agree to resume a build)
    writer.py   build_cache / ensure_cache: append, flush, resume, finalize
    workers.py  structures to graphs in worker processes
    reader.py   GraphCache: Data and Batch out, streamed or in memory
    checks.py   what a reader checks: header, values, recorded sha256
    cli.py      python -m megnet_pt.cache build | info
"""
from .cli import describe, main, read_progress
from .format import FORMAT, SCHEMA_VERSION, CacheError
from .reader import GraphCache
from .writer import BuildReport, build_cache, default_cache_path, ensure_cache

__all__ = [
    "FORMAT", "SCHEMA_VERSION", "BuildReport", "CacheError", "GraphCache", "build_cache", "default_cache_path",
    "describe", "ensure_cache", "main", "read_progress",
]
