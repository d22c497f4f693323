"""DRY_RUN=1: the simulated ranks run in their own log directories, so the jsons' relative paths that
exist in the launcher's working directory reach them absolute (else data or a checkpoint's config dir
present here would silently not be found there)."""
from pathlib import Path

from ms_mm.training.launch import _absolute_paths


def test_existing_relative_paths_become_absolute(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    (tmp_path / "Alpha-VLLM" / "Lumina-mGPT-2.0").mkdir(parents=True)
    given = {"dataset_param": {"basic_parameters": {"dataset": "./data/train.jsonl", "dataset_dir": "./data",
                                                    "missing": "./data/absent.jsonl"}},
             "vocabulary_map_path": "Alpha-VLLM/Lumina-mGPT-2.0/", "model_id": "qwen2_5vl",
             "normalization": "RMSNorm", "list": ["./data", 3, None], "absolute": "/etc"}
    got = _absolute_paths(given, tmp_path)
    basic = got["dataset_param"]["basic_parameters"]
    assert basic["dataset"] == str((tmp_path / "data" / "train.jsonl").resolve())
    assert basic["dataset_dir"] == str((tmp_path / "data").resolve())
    assert basic["missing"] == "./data/absent.jsonl"            # not here: left for the rank to report
    assert Path(got["vocabulary_map_path"]) == (tmp_path / "Alpha-VLLM" / "Lumina-mGPT-2.0").resolve()
    assert got["model_id"] == "qwen2_5vl" and got["normalization"] == "RMSNorm" and got["absolute"] == "/etc"
    assert got["list"] == [str((tmp_path / "data").resolve()), 3, None]
    assert _absolute_paths(given, tmp_path / "elsewhere") == given
