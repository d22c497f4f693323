"""`MllmDataLoader.epoch_order`: the one public hook for a loader's per-epoch order."""
import numpy as np

from ms_mm.data import MllmDataLoader


class _Records:
    """Record i is {"input_ids": [i] * (i % 3 + 1)}: its index and a length that varies."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"input_ids": np.full(i % 3 + 1, i, np.int64)}


def _first_ids(samples):
    return np.array([int(s["input_ids"][0]) for s in samples])


def _loader(cls=MllmDataLoader, n=7, **kw):
    kw = {"micro_batch_size": 1, "collate_fn": _first_ids, "num_workers": 0, "shuffle": False, **kw}
    return cls(_Records(n), **kw)


def test_default_order_deals_records_round_robin():
    # 7 records, 2 ranks, no shuffle: 6 usable, rank 1 reads 1, 3, 5
    loader = _loader(rank=1, world_size=2)
    assert loader.epoch_order(0).tolist() == [1, 3, 5]
    assert [next(loader).tolist() for _ in range(4)] == [[1], [3], [5], [1]]
    loader.close()


class _Backwards(MllmDataLoader):
    def epoch_order(self, epoch):
        return np.arange(len(self.dataset))[::-1] if epoch % 2 == 0 else np.arange(len(self.dataset))


def test_overriding_epoch_order_alone_changes_the_stream_and_resume():
    loader = _loader(_Backwards, n=4, micro_batch_size=2)
    got = [next(loader).tolist() for _ in range(3)]
    assert got == [[3, 2], [1, 0], [0, 1]]          # epoch 0 backwards, epoch 1 forwards
    state = loader.state_dict()
    loader.close()
    again = _loader(_Backwards, n=4, micro_batch_size=2)
    again.load_state_dict(state)
    assert next(again).tolist() == [2, 3]           # the rest of epoch 1, from the saved cursor
    again.close()


def test_group_by_length_sorts_each_window_read_in_epoch_order():
    # lengths: record i has i % 3 + 1 ids; one window = 2 micro batches of 2 = records 5, 4, 3, 2 read backwards
    loader = _loader(_Backwards, n=6, micro_batch_size=2, group_by_length=True, group_window=2)
    first, second = next(loader).tolist(), next(loader).tolist()
    # lengths 3:1, 4:2, 2:3, 5:3 -> sorted by (length, position in the window): 3, 4, 5, 2
    assert (first, second) == ([3, 4], [5, 2])
    loader.close()
