"""mllm_format datasets, collate, and the training loader: order, sharding, resume, bad samples,
prefetch. Data: the bundled demo generator + tiny tokenizer, and the shared Qwen2.5-VL fixture."""
import json
import time

import numpy as np
import pytest

from ms_mm.data import BadSampleError, IGNORE_INDEX, MllmDataLoader, build_dataloader, collate
from ms_mm.models.qwen2_5_vl.processing import build_dataset
from ms_mm.models.qwen2_5_vl.demo import make_demo_dataset, demo_data_config
from ms_mm.data.loader import epoch_shard


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, n=20, seed=3)
    return root


def _cfg(root, **dataloader):
    cfg = demo_data_config(root)
    cfg["dataloader_param"].update(dataloader)
    return cfg


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------- collate
def test_collate_pads_and_concatenates():
    def sample(n, patches, grid):
        ids = np.arange(1, n + 1, dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones(n, np.int64),
                "labels": np.where(ids % 2 == 0, ids, IGNORE_INDEX),
                "pixel_values": np.full((patches, 4), patches, np.float32),
                "image_grid_thw": np.array(grid, np.int64).reshape(-1, 3)}

    a, b = sample(3, 4, [[1, 2, 2]]), sample(5, 0, np.zeros((0, 3)))
    batch = collate([a, b], pad_token_id=99)
    np.testing.assert_array_equal(batch["input_ids"], [[1, 2, 3, 99, 99], [1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(batch["labels"], [[-100, 2, -100, -100, -100], [-100, 2, -100, 4, -100]])
    assert batch["pixel_values"].shape == (4, 4) and batch["image_grid_thw"].tolist() == [[1, 2, 2]]
    assert collate([a, b], 99, pad_to=8)["input_ids"].shape == (2, 8)
    assert collate([a, b], 99, pad_multiple=4)["labels"].shape == (2, 8)
    with pytest.raises(ValueError, match="more than the fixed length pad_to=4"):
        collate([a, b], 99, pad_to=4)


# ------------------------------------------------------------ order/shards
def test_epoch_shards_partition_and_reshuffle():
    shards = [epoch_shard(11, 0, seed=5, rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert not set(shards[0]) & set(shards[1])
    e0, e1 = (epoch_shard(11, e, seed=5, rank=0, world_size=1) for e in (0, 1))
    assert sorted(e0) == sorted(e1) == list(range(11)) and list(e0) != list(e1)
    np.testing.assert_array_equal(epoch_shard(11, 0, 5, 0, 1), epoch_shard(11, 0, 5, 0, 1))
    np.testing.assert_array_equal(epoch_shard(6, 0, 5, 0, 1, shuffle=False), np.arange(6))


def test_loader_batches_are_the_ranks_shard(demo):
    cfg = _cfg(demo)
    ds = build_dataset(cfg)
    pad = ds.processor.pad_token_id
    for rank in range(2):
        loader = build_dataloader(cfg, micro_batch_size=2, seed=7, rank=rank, world_size=2, num_workers=2)
        assert len(loader) == 5
        got = _take(loader, 6)  # one epoch plus the first batch of the next
        order = list(epoch_shard(len(ds), 0, 7, rank, 2)) + list(epoch_shard(len(ds), 1, 7, rank, 2))[:2]
        want = [collate([ds[i] for i in order[j:j + 2]], pad, pad_to=128) for j in range(0, 12, 2)]
        _assert_batches_equal(got, want)
        assert loader.epoch == 1
        loader.close()


def test_same_seed_same_batches_other_seed_other_order(demo):
    cfg = _cfg(demo)
    def first4(**kw):
        with build_dataloader(cfg, micro_batch_size=2, **kw) as loader:
            return _take(loader, 4)

    a, b, c = first4(seed=1), first4(seed=1, num_workers=1), first4(seed=2)
    _assert_batches_equal(a, b)
    assert any(not np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_padding_policy(demo):
    def first(cfg):
        with build_dataloader(cfg, micro_batch_size=3, seed=0) as loader:
            return next(loader)

    longest = first(_cfg(demo, pad_to="longest"))
    assert longest["input_ids"].shape[1] == longest["attention_mask"].sum(1).max()
    bucket = first(_cfg(demo, pad_to="longest", pad_multiple=32))
    assert bucket["input_ids"].shape[1] % 32 == 0
    fixed = first(_cfg(demo))  # demo default: pad to cutoff_len
    assert fixed["labels"].shape == (3, 128)
    path = demo / "data_demo.json"  # a data_*.json file path works too
    path.write_text(json.dumps(_cfg(demo)))
    with build_dataloader(path, micro_batch_size=3, seed=0) as loader:
        np.testing.assert_array_equal(next(loader)["input_ids"], fixed["input_ids"])


# ----------------------------------------------------------------- resume
@pytest.mark.parametrize("stop_after", [2, 7])  # inside the first epoch / after the epoch boundary
def test_resume_continues_exactly(demo, tmp_path, stop_after):
    records = json.loads((demo / "mllm_format_demo_data.json").read_text())
    records.insert(4, {"messages": records[0]["messages"], "images": ["images/missing.png"]})
    data = tmp_path / "with_bad.json"
    data.write_text(json.dumps(records))
    cfg = _cfg(demo)
    cfg["dataset_param"]["basic_parameters"]["dataset"] = str(data)

    def loader():
        return build_dataloader(cfg, micro_batch_size=3, seed=11, skip_bad_samples=True)

    full = loader()
    reference = _take(full, 12)
    assert full.skipped >= 1  # the bad record was met at least once in two epochs
    first = loader()
    _take(first, stop_after)
    assert first.state_dict()["batches"] == stop_after
    state = json.loads(json.dumps(first.state_dict()))  # survives a json round trip (data_state.json)
    first.close()
    resumed = loader()
    resumed.load_state_dict(state)
    _assert_batches_equal(_take(resumed, 12 - stop_after), reference[stop_after:])
    assert resumed.skipped == full.skipped
    full.close()
    resumed.close()

    other = build_dataloader(cfg, micro_batch_size=3, seed=12)
    with pytest.raises(ValueError, match="seed=11"):
        other.load_state_dict(state)


# ------------------------------------------------------------ bad samples
def _bad_jsonl(demo, tmp_path):
    good = json.loads((demo / "mllm_format_demo_data.json").read_text())
    good = [r for r in good if len(r["images"]) == 1][:5]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png at all")
    lines = [json.dumps(good[0]), json.dumps(good[1]),
             '{"messages": [ this is not json',
             json.dumps({**good[2], "images": ["images/nowhere.png"]}),
             json.dumps({**good[2], "images": [str(corrupt)]}),
             json.dumps({**good[3], "images": good[3]["images"] * 2}),
             json.dumps({"images": good[4]["images"]}),
             json.dumps(good[2]), json.dumps(good[3]), json.dumps(good[4])]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = _cfg(demo, shuffle=False)
    cfg["dataset_param"]["basic_parameters"]["dataset"] = str(path)
    return cfg, path


def test_first_bad_sample_raises_naming_file_and_line(demo, tmp_path):
    cfg, path = _bad_jsonl(demo, tmp_path)
    loader = build_dataloader(cfg, micro_batch_size=1, seed=0)
    _take(loader, 2)  # the good samples before the bad one are delivered
    with pytest.raises(BadSampleError, match=rf"{path}:3: malformed json line"):
        next(loader)
    with pytest.raises(BadSampleError):  # stays failed
        next(loader)
    loader.close()

    ds = build_dataset(cfg)
    expected = {3: "image not found: images/nowhere.png", 4: "cannot read image .*corrupt.png",
                5: r"1 <image> placeholder\(s\) but 2 image\(s\)", 6: "record has no 'messages' field"}
    for index, message in expected.items():
        with pytest.raises(BadSampleError, match=rf"{path}:{index + 1}: {message}"):
            ds[index]


def test_skip_bad_samples_counts_and_continues(demo, tmp_path, caplog):
    cfg, path = _bad_jsonl(demo, tmp_path)
    with build_dataloader(cfg, micro_batch_size=2, seed=0, skip_bad_samples=True, num_epochs=1) as loader:
        batches = list(loader)
    assert len(batches) == 2  # 5 good samples -> 2 full batches, the last one dropped
    assert loader.skipped == 5
    logged = [r.getMessage() for r in caplog.records if "skipping bad sample" in r.getMessage()]
    assert sorted(m.split(f"{path}:")[1].split(":")[0] for m in logged if str(path) in m) == list("34567")


def test_loader_that_can_never_fill_a_batch_fails_instead_of_hanging(demo, tmp_path):
    """Too few records for one micro batch, or an epoch of only bad samples: an error, not a stall."""
    with pytest.raises(ValueError, match="cannot fill one micro batch of 32"):
        build_dataloader(_cfg(demo), micro_batch_size=32, seed=0)  # 20 records

    good = json.loads((demo / "mllm_format_demo_data.json").read_text())[:4]
    path = tmp_path / "all_bad.jsonl"
    path.write_text("".join(json.dumps({**r, "images": ["images/nowhere.png"] * len(r["images"])}) + "\n"
                            for r in good))
    cfg = _cfg(demo, shuffle=False)
    cfg["dataset_param"]["basic_parameters"]["dataset"] = str(path)
    with build_dataloader(cfg, micro_batch_size=1, seed=0, skip_bad_samples=True) as loader:
        with pytest.raises(ValueError, match="gave no micro batch of 1: 4 bad samples were skipped"):
            next(loader)


def test_malformed_json_file_names_file(tmp_path, demo):
    bad = tmp_path / "broken.json"
    bad.write_text('[{"messages": []},\n  {oops}]')
    cfg = _cfg(demo)
    cfg["dataset_param"]["basic_parameters"]["dataset"] = str(bad)
    with pytest.raises(ValueError, match=r"broken\.json: malformed json at line 2"):
        build_dataloader(cfg)


# ---------------------------------------------------------------- prefetch
class _SlowDataset:
    """A dataset whose samples take a fixed time to make (like image decoding)."""

    def __init__(self, inner, delay):
        self.inner, self.delay = inner, delay

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        time.sleep(self.delay)
        return self.inner[i]


def test_loader_keeps_ahead_of_a_slow_consumer(demo):
    ds = build_dataset(_cfg(demo))
    pad = ds.processor.pad_token_id
    loader = MllmDataLoader(_SlowDataset(ds, 0.05), 2, lambda s: collate(s, pad), num_workers=2,
                            prefetch_batches=4, seed=0)
    next(loader)
    deadline = time.time() + 20
    while loader.prefetched < 4 and time.time() < deadline:  # fills while the consumer is away
        time.sleep(0.05)
    assert loader.prefetched == 4
    waited = 0.0
    for _ in range(8):
        time.sleep(0.15)  # the "train step": longer than one batch takes to load
        t = time.perf_counter()
        next(loader)
        waited += time.perf_counter() - t
    # synchronous loading would wait 8 x 2 x 0.05 s = 0.8 s
    assert waited < 0.2, f"consumer waited {waited:.3f}s for data"
    loader.close()


# ------------------------------------------------------------ model seam
def test_batches_go_through_build_model_inputs(fixture_root, tmp_path):
    """Seam to ms_mm.models.qwen2_5_vl.inputs: the fixture sample, through build_dataloader with
    the tiny model config, gives the model inputs in MODEL_INPUT_NAMES order."""
    from ms_mm.models.qwen2_5_vl.config import Qwen2_5_VLConfig
    from ms_mm.models.qwen2_5_vl.inputs import MODEL_INPUT_NAMES

    d = fixture_root / "qwen2_5_vl" / "processor"
    conv = json.loads((d / "conversation.json").read_text())["messages"]
    msgs = [{"role": m["role"], "content": "".join("<image>" if c["type"] == "image" else c["text"]
                                                   for c in m["content"])} for m in conv]
    (tmp_path / "data.json").write_text(json.dumps([{"messages": msgs, "images": ["image.png"]}]))
    cfg = {"dataset_param": {"preprocess_parameters": {"model_name_or_path": str(d / "hf_processor")},
                             "basic_parameters": {"dataset_dir": str(d), "dataset": str(tmp_path / "data.json"),
                                                  "template": "qwen2vl", "cutoff_len": 1024}},
           "dataloader_param": {"shuffle": True, "pad_to": "longest", "patch_buckets": None}}   # unpadded, as the fixture
    with build_dataloader(cfg, Qwen2_5_VLConfig.preset("tiny"), micro_batch_size=1) as loader:
        batch = next(loader)
    assert tuple(batch) == tuple(MODEL_INPUT_NAMES)
    expected = np.load(d / "expected.npz")
    np.testing.assert_array_equal(batch["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(batch["labels"], expected["labels"])
    np.testing.assert_array_equal(batch["pixel_values"].shape, expected["pixel_values"].shape)


def test_process_workers_give_the_same_batches(demo, tmp_path):
    cfg, path = _bad_jsonl(demo, tmp_path)
    ds = build_dataset(cfg)
    pad = ds.processor.pad_token_id

    def run(worker_type, num_workers):
        with MllmDataLoader(ds, 2, lambda s: collate(s, pad), shuffle=False, skip_bad_samples=False,
                            num_workers=num_workers, worker_type=worker_type) as loader:
            got = [next(loader)]
            with pytest.raises(BadSampleError) as err:
                next(loader)
            return got, err.value

    (threads, e1), (procs, e2), (inline, e3) = run("thread", 2), run("process", 2), run("thread", 0)
    _assert_batches_equal(threads, procs)
    _assert_batches_equal(threads, inline)
    assert e1.where == e2.where == e3.where == f"{path}:3"


# ---------------------------------------------------------------- the producer (ms_mm.data.prefetch.Prefetcher)
class _CountingDataset:
    """Records 0..n-1 as themselves; counts how many were made."""

    def __init__(self, n, delay=0.0):
        self.n, self.delay, self.made = n, delay, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        time.sleep(self.delay)
        self.made += 1
        return i


def _ints(samples):
    return {"x": np.asarray(samples)}


def _producer_threads():
    import threading
    return [t for t in threading.enumerate() if t.name == "ms_mm-data-producer" and t.is_alive()]


def test_end_of_data_is_final_and_positions_follow_the_batches():
    # 7 records, no shuffle, one rank, micro batch 2, drop_last: [0,1] [2,3] [4,5], record 6 dropped
    loader = MllmDataLoader(_CountingDataset(7), 2, _ints, shuffle=False, num_workers=2, num_epochs=1)
    got, cursors = [], []
    for batch in loader:
        got.append(batch["x"].tolist())
        cursors.append((loader.state_dict()["cursor"], loader.state_dict()["batches"]))
    assert got == [[0, 1], [2, 3], [4, 5]]
    assert cursors == [(2, 1), (4, 2), (6, 3)]   # after the last sample of each batch
    for _ in range(2):
        with pytest.raises(StopIteration):
            next(loader)
    loader.close()
    assert not _producer_threads()


def test_a_failure_is_raised_after_the_batches_before_it_and_stays():
    def collate_fails_on_third(samples):
        if samples[0] == 4:
            raise RuntimeError("collate broke on batch 3")
        return _ints(samples)

    loader = MllmDataLoader(_CountingDataset(10), 2, collate_fails_on_third, shuffle=False, num_workers=0)
    assert [next(loader)["x"].tolist() for _ in range(2)] == [[0, 1], [2, 3]]
    for _ in range(2):
        with pytest.raises(RuntimeError, match="collate broke on batch 3"):
            next(loader)
    state = loader.state_dict()
    assert state["batches"] == 2 and state["cursor"] == 4
    assert not _producer_threads()
    loader.close()
    with pytest.raises(RuntimeError, match="collate broke on batch 3"):   # close() does not forget it
        next(loader)
    loader.load_state_dict({**state, "cursor": 6})   # a new position starts over, past the bad batch
    assert next(loader)["x"].tolist() == [6, 7]
    loader.close()


def test_close_stops_the_producer_and_pending_work_then_iteration_resumes_in_place():
    ds = _CountingDataset(200, delay=0.01)
    loader = MllmDataLoader(ds, 1, _ints, shuffle=False, num_workers=2, prefetch_batches=1)
    assert next(loader)["x"].tolist() == [0]
    loader.close()
    assert not _producer_threads()
    time.sleep(0.1)                 # samples already running when close() came may still finish
    made = ds.made
    time.sleep(0.2)
    assert ds.made == made < 20     # nothing more is made: the queued futures were cancelled
    # iterating again restarts from the position after the last batch handed out
    assert [next(loader)["x"].tolist() for _ in range(3)] == [[1], [2], [3]]
    loader.close()
    assert not _producer_threads()
