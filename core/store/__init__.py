"""The feature cache, the only code that knows HDF5 dataset and attribute names, split by job:
`layout` (the format, which its docstring documents; names, provenance, checksums), `writer`,
`loader` (whole splits into memory), `items` (item by item from the shards, for caches larger
than memory) and `repair` (`verify`, and the command that rebuilds a damaged file).

Importers use `from core import store` and `store.X`: the names below are the whole API, so a
module can change its insides without its importers changing."""

from core.errors import UserError
from core.store.items import ItemReader
from core.store.layout import (CHECKSUM, FORMAT_VERSION, IMAGE, MAP_FILTERS, TEXT, Provenance, cache_folder,
                               check_name, id_problem, index_digest, sha256_file, shard_damage, shard_name,
                               sidecar, slug, split_limit, unverified, view_folder, view_folders)
from core.store.loader import (ImageFeatures, TextFeatures, feature_bytes, load_image, load_text, open_index,
                               pooled_maps, provenance, read_dataset_info, read_meta, read_provenance,
                               shard_problems)
from core.store.repair import (DatasetCheck, FolderCheck, check_folder, damage_message, damage_summary,
                               repair_command, verify)
from core.store.writer import _atomic, finish, prepare, write_dataset_info, write_image_shard, write_text_shard

__all__ = [
    "UserError", "ItemReader", "CHECKSUM", "FORMAT_VERSION", "IMAGE", "MAP_FILTERS", "TEXT", "Provenance",
    "cache_folder", "check_name", "id_problem", "index_digest", "sha256_file", "shard_damage", "shard_name",
    "sidecar", "slug", "split_limit", "unverified", "view_folder", "view_folders", "ImageFeatures",
    "TextFeatures", "feature_bytes", "load_image", "load_text", "open_index", "pooled_maps", "provenance",
    "read_dataset_info", "read_meta", "read_provenance", "shard_problems", "DatasetCheck", "FolderCheck",
    "check_folder", "damage_message", "damage_summary", "repair_command", "verify", "_atomic", "finish",
    "prepare", "write_dataset_info", "write_image_shard", "write_text_shard",
]
