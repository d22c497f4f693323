"""MindSpeed-MM `mllm_format` datasets (LLaMA-Factory sharegpt style) read from json / jsonl.

A record is `{"messages": [{"role": "user", "content": "<image>..."}, {"role": "assistant",
"content": "..."}, ...], "images": ["relative/path.jpg", ...]}`; the key and role names come
from the data json's `attr` block (`messages`, `images`, `system`, `role_tag`, `content_tag`,
`user_tag`, `assistant_tag`, `system_tag`). Image paths are resolved like LLaMA-Factory's media
lookup: relative to `dataset_dir` if the file is there, else as given (relative to the working
directory), else next to the json file.

Records are read once, up front (a malformed json file fails here, naming it); a malformed
*line* of a jsonl file is kept as a bad record so it is reported, or skipped, when the loader
reaches it, with the file and line number. Everything per-sample (images, tokens) happens in
`MllmDataset[i]`, which raises `BadSampleError` naming the record.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from ms_mm.data.errors import BadSampleError

DEFAULT_ATTR = {
    "system": None, "images": "images", "messages": "messages", "role_tag": "role",
    "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant", "system_tag": None,
    "videos": None,
}


class _BadRecord:
    """Placeholder for a record that could not even be parsed (kept to report it in order)."""

    def __init__(self, reason: str):
        self.reason = reason


def read_records(path: str | os.PathLike) -> list[tuple[str, object]]:
    """Read a `.json` (list of records) or `.jsonl` (one record per line) file.

    Returns `(where, record)` pairs, `where` being "file[index]" or "file:line"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    if path.suffix == ".jsonl" or (path.suffix != ".json" and not text.lstrip().startswith("[")):
        out = []
        # split on "\n" only: str.splitlines would also break at U+2028 etc. inside json strings
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                out.append((where, json.loads(line)))
            except json.JSONDecodeError as e:
                out.append((where, _BadRecord(f"malformed json line: {e}")))
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed json at line {e.lineno} column {e.colno}: {e.msg}") from None
    if isinstance(data, dict):  # a single record
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of records, got {type(data).__name__}")
    return [(f"{path}[{i}]", rec) for i, rec in enumerate(data)]


def resolve_dataset_files(dataset: str | Sequence[str], dataset_dir: str | os.PathLike | None) -> list[Path]:
    """`basic_parameters.dataset` (a path, comma-separated paths or a list) → existing files.

    A relative path is taken as given (working directory) first, then under `dataset_dir`."""
    names = dataset.split(",") if isinstance(dataset, str) else list(dataset)
    files = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        candidates = [Path(name)]
        if dataset_dir is not None and not Path(name).is_absolute():
            candidates.append(Path(dataset_dir) / name)
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"dataset file {name!r} not found (looked at "
                                    + ", ".join(str(c) for c in candidates) + ")")
        files.append(found)
    if not files:
        raise ValueError("basic_parameters.dataset names no file")
    return files


class MllmDataset:
    """Indexable mllm_format dataset: `ds[i]` → the processor dict of record i."""

    def __init__(self, files: Sequence[str | os.PathLike], processor, dataset_dir=None,
                 attr: dict | None = None, max_samples: int | None = None):
        self.processor = processor
        self.dataset_dir = Path(dataset_dir) if dataset_dir is not None else None
        self.attr = {**DEFAULT_ATTR, **{k: v for k, v in (attr or {}).items() if v is not None}}
        self.records: list[tuple[str, object, Path]] = []
        for f in files:
            f = Path(f)
            self.records += [(where, rec, f.parent) for where, rec in read_records(f)]
        if max_samples is not None:
            self.records = self.records[:int(max_samples)]
        if not self.records:
            raise ValueError("dataset is empty: " + ", ".join(str(f) for f in files))

    def __len__(self) -> int:
        return len(self.records)

    def where(self, index: int) -> str:
        return self.records[index][0]

    def __getitem__(self, index: int) -> dict:
        where, record, json_dir = self.records[index]
        try:
            messages, images, system = self._parse(record, json_dir)
            return self.processor(messages, images, system=system)
        except BadSampleError as e:
            raise e.located(where) from None

    # ------------------------------------------------------------------
    def _parse(self, record, json_dir: Path):
        if isinstance(record, _BadRecord):
            raise BadSampleError(record.reason)
        if not isinstance(record, dict):
            raise BadSampleError(f"record is a {type(record).__name__}, expected an object")
        a = self.attr
        msgs = record.get(a["messages"])
        if msgs is None:
            raise BadSampleError(f"record has no {a['messages']!r} field")
        if not isinstance(msgs, list) or not msgs:
            raise BadSampleError(f"{a['messages']!r} must be a non-empty list")
        roles = {a["user_tag"]: "user", a["assistant_tag"]: "assistant"}
        if a.get("system_tag"):
            roles[a["system_tag"]] = "system"
        roles.setdefault("system", "system")
        messages = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or a["role_tag"] not in m or a["content_tag"] not in m:
                raise BadSampleError(f"message {i} needs {a['role_tag']!r} and {a['content_tag']!r}")
            role = roles.get(m[a["role_tag"]])
            if role is None:
                raise BadSampleError(f"message {i}: unknown role {m[a['role_tag']]!r}")
            messages.append({"role": role, "content": m[a["content_tag"]]})
        if record.get(a.get("videos") or "videos"):
            raise BadSampleError("videos are not supported by this pipeline yet")
        system = record.get(a["system"]) if a.get("system") else None
        images = record.get(a["images"]) or []
        if isinstance(images, str):
            images = [images]
        return messages, [self._resolve_image(p, json_dir) for p in images], system

    def _resolve_image(self, path, json_dir: Path) -> str:
        if not isinstance(path, str):
            raise BadSampleError(f"image entry must be a path string, got {path!r}")
        if os.path.isabs(path):
            return path
        candidates = ([self.dataset_dir / path] if self.dataset_dir is not None else []) + \
            [Path(path), json_dir / path]
        for c in candidates:
            if c.is_file():
                return str(c)
        raise BadSampleError(f"image not found: {path} (looked at "
                             + ", ".join(str(c) for c in candidates) + ")")
