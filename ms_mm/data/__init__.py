"""ms_mm/data: the family-neutral data engine — reading records, images, batching, the loader.

Public API (see docs/internals.md, "Data API"):
- `build_dataloader(data_cfg, model_config, micro_batch_size, seed, rank, world_size, num_workers,
  skip_bad_samples)`: the resumable, sharded, prefetching training loader of the model family whose
  format the data json's `dataset_type` names (looked up in `ms_mm.registry`).
- `MllmDataLoader` (order, sharding, prefetch, resume, bad samples), `collate`, `MllmDataset`
  (mllm_format json/jsonl records), `load_image`, `BadSampleError`, `IGNORE_INDEX`,
  `load_data_config`; `demo.make_demo_dataset` (the shapes-and-colours demo data every family's
  embedded default uses); `tiny_tokenizer` (the shared builder of the bundled tiny tokenizers);
  `Prefetcher` (the one background producer thread every loader runs its batch iterator in).
Family processors live in their family folders (`ms_mm/models/<family>/processing.py`).
"""
from ms_mm.data.errors import BadSampleError
from ms_mm.data.images import load_image
from ms_mm.data.loader import IGNORE_INDEX, MllmDataLoader, build_dataloader, collate, load_data_config
from ms_mm.data.mllm_dataset import MllmDataset
from ms_mm.data.prefetch import Prefetcher

__all__ = ["BadSampleError", "IGNORE_INDEX", "MllmDataLoader", "MllmDataset", "build_dataloader", "collate",
           "load_data_config", "load_image", "Prefetcher"]
