"""ms_mm/data: datasets, processors and loaders that turn conversations + images into batches.

Public API (see docs/internals.md, "Data API"):
- `Qwen2VLDataProcessor(processor_dir, min_pixels, max_pixels, ...)`: one sample → processor dict.
- `build_dataloader(data_cfg, model_config, micro_batch_size, seed, rank, world_size, num_workers,
  skip_bad_samples)`: the resumable, sharded, prefetching training loader.
- `collate`, `MllmDataset`, `BadSampleError`; `demo.make_demo_dataset`; `tiny_tokenizer.asset_dir`.
- DeepSeek-VL2 (`deepseek_vl2.py`): `DeepseekVL2DataProcessor`, `DeepseekVL2Dataset`,
  `collate_deepseek_vl2`, `build_deepseek_vl2_dataloader` (also reached through `build_dataloader`
  for a `dataset_type: "deepseekvl2"` data.json); `deepseek_vl2_demo`, `deepseek_vl2_tokenizer`.
"""
from ms_mm.data.deepseek_vl2 import (DeepseekVL2DataProcessor, DeepseekVL2Dataset, build_deepseek_vl2_dataloader,
                                     collate_deepseek_vl2)
from ms_mm.data.errors import BadSampleError
from ms_mm.data.loader import (MllmDataLoader, build_dataloader, build_dataset, build_processor, collate,
                               load_data_config)
from ms_mm.data.mllm_dataset import MllmDataset
from ms_mm.data.processor import IGNORE_INDEX, Qwen2VLDataProcessor

__all__ = [
    "BadSampleError", "DeepseekVL2DataProcessor", "DeepseekVL2Dataset", "IGNORE_INDEX", "MllmDataLoader",
    "MllmDataset", "Qwen2VLDataProcessor",
    "build_dataloader", "build_dataset", "build_deepseek_vl2_dataloader", "build_processor", "collate",
    "collate_deepseek_vl2", "load_data_config",
]
