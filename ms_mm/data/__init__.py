"""ms_mm/data: datasets, processors and loaders that turn conversations + images into batches.

Public API (see docs/internals.md, "Data API"):
- `Qwen2VLDataProcessor(processor_dir, min_pixels, max_pixels, ...)`: one sample → processor dict.
- `build_dataloader(data_cfg, model_config, micro_batch_size, seed, rank, world_size, num_workers,
  skip_bad_samples)`: the resumable, sharded, prefetching training loader.
- `collate`, `MllmDataset`, `BadSampleError`; `demo.make_demo_dataset`; `tiny_tokenizer.asset_dir`.
"""
from ms_mm.data.errors import BadSampleError
from ms_mm.data.loader import (MllmDataLoader, build_dataloader, build_dataset, build_processor, collate,
                               load_data_config)
from ms_mm.data.mllm_dataset import MllmDataset
from ms_mm.data.processor import IGNORE_INDEX, Qwen2VLDataProcessor

__all__ = [
    "BadSampleError", "IGNORE_INDEX", "MllmDataLoader", "MllmDataset", "Qwen2VLDataProcessor",
    "build_dataloader", "build_dataset", "build_processor", "collate", "load_data_config",
]
