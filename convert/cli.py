"""`mm-convert`: the MindSpeed-MM style command line over `convert.framework`.

    mm-convert <Converter> hf_to_mm --cfg.mm_dir DIR --cfg.hf_config.hf_dir DIR
        [--cfg.parallel_config.llm_pp_layers [[1,10,10,7]]] [--cfg.parallel_config.vit_pp_layers [[32,0,0,0]]]
        [--cfg.parallel_config.tp_size 1] [--cfg.parallel_config.ep_size 1] [--cfg.trust_remote_code False]
    mm-convert <Converter> mm_to_hf --cfg.mm_dir DIR --cfg.hf_config.hf_dir DIR --cfg.save_hf_dir DIR
        [--cfg.parallel_config.* as above, checked against the checkpoint] [--cfg.iteration N]
        [--cfg.max_shard_size 5GB] [--cfg.trust_remote_code False]
    mm-convert <Converter> resplit --cfg.source_dir DIR --cfg.target_dir DIR
        --cfg.target_parallel_config.tp_size N --cfg.target_parallel_config.llm_pp_layers [...] ...
        [--cfg.target_parallel_config.ep_size N] [--cfg.source_parallel_config.* checked against the source]

e.g. the DeepSeek-VL2 guide:
    mm-convert DeepSeekVLConverter hf_to_mm --cfg.mm_dir pretrained/DeepSeekVl2 \
        --cfg.hf_config.hf_dir raw_ckpt/DeepSeekVL2 --cfg.parallel_config.llm_pp_layers [[13,17]] \
        --cfg.parallel_config.vit_pp_layers [[27,0]] --cfg.parallel_config.ep_size 8 \
        --cfg.parallel_config.tp_size 1 --cfg.trust_remote_code True

ep_size: the routed experts, stacked ([E, 2I, H] / [E, H, I]), are cut on the expert axis into
contiguous blocks of whole experts, experts [r*E/ep_size, (r+1)*E/ep_size) to EP rank r (rank dirs
mp_rank_TT[_PPP][_EEE], as MindSpeed-MM); ep_size must divide the number of routed experts E.
Non-expert tensors are repeated on every EP rank.

trust_remote_code (default False, as in MindSpeed-MM): checkpoints whose config.json names a
custom-code model type that transformers cannot load by itself (DeepSeek-VL2: "deepseek_vl_v2")
are converted only with --cfg.trust_remote_code True, your statement that you trust the download.
ms-mm never imports or runs code from a checkpoint either way: the flag only allows reading such a
config.json as data. Other families ignore it.

Values are parsed as JSON when they are JSON (`[[1,10,10,7]]`, `2`, `true`), else kept as strings;
`--cfg.key=value` works too. Every error names the bad argument and exits with status 2
(usage, including a custom-code config.json without --cfg.trust_remote_code True) or 1 (conversion).
"""
from __future__ import annotations

import json
import re
import sys
from typing import Any, Dict, List, Optional

from convert.framework import (
    ConversionError, RemoteCodeNotTrusted, check_layout_args, custom_model_types, hf_to_mm, mm_to_hf, resplit,
)
from convert.registry import UnknownFamilyError, get_spec, known_specs
from ms_mm.training.mm_checkpoint import CheckpointError, open_model

ACTIONS = ("hf_to_mm", "mm_to_hf", "resplit")


class UsageError(Exception):
    pass


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_cfg(argv: List[str]) -> Dict[str, Any]:
    """`--cfg.a.b value` / `--cfg.a.b=value` pairs → {"a.b": value}."""
    out: Dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--cfg."):
            raise UsageError(f"unexpected argument {arg!r} (options look like --cfg.mm_dir DIR)")
        key = arg[len("--cfg."):]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--cfg."):
                raise UsageError(f"option --cfg.{key} needs a value")
            raw = argv[i + 1]
            i += 2
        if key in out:
            raise UsageError(f"option --cfg.{key} given twice")
        out[key] = _parse_value(raw)
    return out


def _parse_size(value, key) -> int:
    if isinstance(value, int) and value > 0:
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(value), re.I)
    if not m:
        raise UsageError(f"--cfg.{key}: expected a size like 5GB or a byte count, got {value!r}")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}[unit]
    return int(float(m.group(1)) * mult)


def _take(cfg: Dict[str, Any], key: str, required: bool = False, kind=None):
    if key not in cfg:
        if required:
            raise UsageError(f"missing required option --cfg.{key}")
        return None
    value = cfg.pop(key)
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise UsageError(f"--cfg.{key}: expected an integer, got {value!r}")
    if kind is str:
        value = str(value)
    return value


def _parallel(cfg: Dict[str, Any], prefix: str, pp_keys) -> Dict[str, Any]:
    tp = _take(cfg, f"{prefix}.tp_size", kind=int)
    if tp is not None and tp < 1:
        raise UsageError(f"--cfg.{prefix}.tp_size must be >= 1, got {tp}")
    ep = _take(cfg, f"{prefix}.ep_size", kind=int)
    if ep is not None and ep < 1:
        raise UsageError(f"--cfg.{prefix}.ep_size must be >= 1, got {ep}")
    pp = {k: _take(cfg, f"{prefix}.{k}_pp_layers") for k in pp_keys}
    return {"tp_size": tp, "ep_size": ep, "pp_layers": {k: v for k, v in pp.items() if v is not None}}


def run(argv: List[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        specs, _ = known_specs()
        print("converters: " + ", ".join(s.converter for s in specs))
        return 0
    if len(argv) < 2:
        raise UsageError("usage: mm-convert <Converter> <hf_to_mm|mm_to_hf|resplit> --cfg.<key> <value> ...")
    name, action, rest = argv[0], argv[1], argv[2:]
    try:
        spec = get_spec(name)
    except UnknownFamilyError as e:
        raise UsageError(str(e)) from None
    if action not in ACTIONS:
        raise UsageError(f"unknown action {action!r} for {spec.converter}; choose one of {', '.join(ACTIONS)}")
    cfg = parse_cfg(rest)
    pp_keys = list(spec.pp_modules)
    # MindSpeed-MM's rule (its guides: "trust_remote_code defaults to False for safety; set it to True
    # and make sure the downloaded model is safe"): a config.json whose model_type is custom code
    # (DeepSeek-VL2's deepseek_vl_v2) is refused without it. Here it only unlocks reading that
    # config as data: no code from the checkpoint is ever imported or run.
    trust = cfg.pop("trust_remote_code", False)
    if trust not in (False, True, "false", "False", "true", "True"):
        raise UsageError(f"--cfg.trust_remote_code: expected True or False, got {trust!r}")
    trust = trust in (True, "true", "True")
    if trust and not custom_model_types(spec):
        print(f"mm-convert: note: --cfg.trust_remote_code is accepted but unused for {spec.converter}: its "
              f"config.json is a transformers model type, and no checkpoint code is executed", file=sys.stderr)
    # BAGEL / Lumina guides name the directories source_path / target_path
    aliases = {"hf_to_mm": (("source_path", "hf_config.hf_dir"), ("target_path", "mm_dir")),
               "mm_to_hf": (("source_path", "mm_dir"), ("target_path", "save_hf_dir"))}.get(action, ())
    for alias, key in aliases:
        if alias in cfg:
            if key in cfg:
                raise UsageError(f"--cfg.{alias} and --cfg.{key} name the same directory; give one")
            cfg[key] = cfg.pop(alias)

    if action == "hf_to_mm":
        mm_dir = _take(cfg, "mm_dir", True, str)
        hf_dir = _take(cfg, "hf_config.hf_dir", True, str)
        par = _parallel(cfg, "parallel_config", pp_keys)
        _no_leftovers(cfg, spec, action)
        out = hf_to_mm(hf_dir, mm_dir, spec, par["tp_size"] or 1, par["pp_layers"], ep_size=par["ep_size"] or 1,
                       trust_remote_code=trust)
        print(f"mm-convert: wrote {out}")
    elif action == "mm_to_hf":
        mm_dir = _take(cfg, "mm_dir", True, str)
        hf_dir = _take(cfg, "hf_config.hf_dir", True, str)
        save = _take(cfg, "save_hf_dir", True, str)
        iteration = _take(cfg, "iteration")
        shard = _take(cfg, "max_shard_size")
        par = _parallel(cfg, "parallel_config", pp_keys)
        _no_leftovers(cfg, spec, action)
        kw = {"max_shard_bytes": _parse_size(shard, "max_shard_size")} if shard is not None else {}
        out = mm_to_hf(mm_dir, hf_dir, save, spec, par["tp_size"], par["pp_layers"], iteration,
                       ep_size=par["ep_size"], trust_remote_code=trust, **kw)
        print(f"mm-convert: wrote {out}")
    else:
        src = _take(cfg, "source_dir", True, str)
        dst = _take(cfg, "target_dir", True, str)
        iteration = _take(cfg, "iteration")
        source = _parallel(cfg, "source_parallel_config", pp_keys)
        target = _parallel(cfg, "target_parallel_config", pp_keys)
        _no_leftovers(cfg, spec, action)
        try:
            layout = open_model(src, iteration).layout
        except CheckpointError as e:
            raise ConversionError(str(e)) from e
        check_layout_args(layout, source["tp_size"], source["pp_layers"], src, source["ep_size"])
        out = resplit(src, dst, target["tp_size"] or 1, target["pp_layers"], iteration, spec,
                      ep_size=target["ep_size"] or 1)
        print(f"mm-convert: wrote {out}")
    return 0


_KNOWN = {
    "hf_to_mm": ["mm_dir (alias target_path)", "hf_config.hf_dir (alias source_path)", "parallel_config.tp_size",
                 "parallel_config.ep_size", "parallel_config.<m>_pp_layers", "trust_remote_code"],
    "mm_to_hf": ["mm_dir (alias source_path)", "hf_config.hf_dir", "save_hf_dir (alias target_path)", "iteration",
                 "max_shard_size",
                 "parallel_config.tp_size", "parallel_config.ep_size", "parallel_config.<m>_pp_layers",
                 "trust_remote_code"],
    "resplit": ["source_dir", "target_dir", "iteration", "source_parallel_config.{tp_size,ep_size}",
                "source_parallel_config.<m>_pp_layers", "target_parallel_config.{tp_size,ep_size}",
                "target_parallel_config.<m>_pp_layers", "trust_remote_code"],
}


def _no_leftovers(cfg, spec, action):
    if cfg:
        mods = "|".join(spec.pp_modules) or "-"
        known = ", ".join("--cfg." + k.replace("<m>", f"{{{mods}}}") for k in _KNOWN[action])
        raise UsageError(f"unknown option(s) {', '.join('--cfg.' + k for k in cfg)} for {spec.converter} "
                         f"{action}; known: {known}")


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(argv)
    except (UsageError, RemoteCodeNotTrusted) as e:
        print(f"mm-convert: error: {e}", file=sys.stderr)
        return 2
    except (ConversionError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"mm-convert: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
