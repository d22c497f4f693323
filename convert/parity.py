"""``mm-parity``: run an HF-layout checkpoint through ms-mm and write what the reference wrote.

    mm-parity qwen2_5_vl --hf-dir DIR --inputs inputs.npz --out out.npz [--grad HF_NAME ...]
                         [--reference outputs.npz]

The checkpoint goes through the project's own converter (``convert.load_hf_as_mm``), the
model runs in MindSpore graph mode in fp32, and gradients are mapped back to HF tensor names
(``convert.mm_grads_to_hf``: fused qkv / gate-up split exactly). With ``--reference`` each
written array is compared with the same key there, with the suggested fp32 tolerances, and the
exit status says whether all of them hold.

A family offers runners in its registry record (``Family.parity``: mm-parity name -> runner,
``ms_mm/models/<family>/parity.py``):
``runner(hf_dir, inputs: dict[str, np.ndarray], grad_names: list[str]) -> dict[str, np.ndarray]``;
it raises ``ParityError("inputs: ...")`` (or ``ValueError``) for a bad input key or shape (the CLI puts
the file name in).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from typing import Dict, List, Sequence

import numpy as np

from ms_mm import registry

# (atol, rtol) per output kind (DESIGN.md); integer outputs (ids, routing) are compared exactly
TOLERANCES = {
    "activation": (1e-4, 1e-4),   # logits, embeddings, routing weights
    "loss": (1e-5, 0.0),          # every scalar loss: lm loss, MoE aux losses
    "grad": (1e-5, 1e-3),
}


def output_kind(key: str) -> str:
    if key.startswith("grad"):    # grad.<name>, grad_ce_only.<name>
        return "grad"
    if key.endswith("loss"):      # loss, moe.layer1.aux_loss
        return "loss"
    return "activation"


class ParityError(ValueError):
    """Bad family, input file, key or shape: the message names it."""


def parity_names() -> List[str]:
    return sorted(name for f in registry.families() for name in f.parity)


def _runner(family: str):
    for f in registry.families():
        if family in f.parity:
            return f.parity[family]
    raise ParityError(f"unknown model family {family!r} for mm-parity; known: {', '.join(parity_names())}")


def load_npz(path: str, what: str = "--inputs", required: Sequence[str] = ()) -> Dict[str, np.ndarray]:
    """All arrays of an .npz file; ``what`` names the argument in error messages."""
    if not os.path.isfile(path):
        raise ParityError(f"{what} {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ParityError(f"{what} {path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    missing = [k for k in required if k not in arrays]
    if missing:
        raise ParityError(f"{what} {path}: missing key(s) {missing}; it has {sorted(arrays)}")
    return arrays


def _canonical_hf_name(spec, name: str) -> str:
    for pattern, repl in getattr(spec, "hf_aliases", ()) or ():
        name = re.sub(pattern, repl, name)
    return name


def check_grad_names(family, config, mm_state, grad_names) -> None:
    """Fail before any compute if a requested gradient is not a tensor of this checkpoint."""
    import convert

    if not grad_names:
        return
    spec = convert.get_spec(family)
    known = set(convert.mm_state_to_hf(family, config, mm_state))
    for name in grad_names:
        if _canonical_hf_name(spec, name) not in known:
            close = sorted(k for k in known if k.split(".")[-1] == name.split(".")[-1])[:4]
            raise ParityError(f"--grad {name}: not a tensor of this {family} checkpoint"
                              + (f" (e.g. {', '.join(close)})" if close else ""))


def select_grads(family, config, mm_grads, grad_names):
    import convert

    spec = convert.get_spec(family)
    hf_grads = convert.mm_grads_to_hf(family, config, mm_grads)
    return {f"grad.{name}": hf_grads[_canonical_hf_name(spec, name)] for name in grad_names}


def run_parity(family: str, hf_dir, inputs: Dict[str, np.ndarray], grad_names: Sequence[str] = ()):
    """Python entry of ``mm-parity``: {output key: array} for one checkpoint and one input batch."""
    if not os.path.isdir(hf_dir):
        raise ParityError(f"--hf-dir {hf_dir}: no such directory")
    return _runner(family)(hf_dir, inputs, list(grad_names))


def compare(outputs: Dict[str, np.ndarray], reference: Dict[str, np.ndarray]):
    """[(key, ok, message)] for every output key also present in ``reference``."""
    rows = []
    for key in sorted(outputs):
        if key not in reference:
            continue
        got, want = np.asarray(outputs[key]), np.asarray(reference[key])
        if got.shape != want.shape:
            rows.append((key, False, f"shape {list(got.shape)} vs reference {list(want.shape)}"))
            continue
        if np.issubdtype(want.dtype, np.integer):
            ok = np.array_equal(got, want)
            rows.append((key, ok, "exact" if ok else f"{int((got != want).sum())} entries differ"))
            continue
        atol, rtol = TOLERANCES[output_kind(key)]
        diff = np.abs(got.astype(np.float64) - want)
        ok = bool(np.all(diff <= atol + rtol * np.abs(want)))
        rows.append((key, ok, f"max|diff| {diff.max() if diff.size else 0.0:.3g} (atol {atol:g}, rtol {rtol:g})"))
    return rows


def _save_npz_atomic(path: str, arrays: Dict[str, np.ndarray]) -> None:
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mm-parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("family", help=f"model family ({', '.join(parity_names())})")
    parser.add_argument("--hf-dir", required=True, help="checkpoint directory in the upstream HF layout")
    parser.add_argument("--inputs", required=True, help=".npz with the processor outputs (fixture format)")
    parser.add_argument("--out", required=True, help=".npz to write")
    parser.add_argument("--grad", action="append", default=[], metavar="HF_NAME",
                        help="also write d(loss)/d(HF_NAME) as grad.HF_NAME (repeatable)")
    parser.add_argument("--reference", help="compare the outputs with this .npz; exit 1 if out of tolerance")
    args = parser.parse_args(argv)
    try:
        _runner(args.family)  # unknown family fails before anything is loaded
        reference = None
        if args.reference:
            reference = load_npz(args.reference, "--reference")
        inputs = load_npz(args.inputs, "--inputs")     # each family's runner checks its own keys
        import mindspore as ms
        ms.set_context(mode=ms.GRAPH_MODE)
        outputs = run_parity(args.family, args.hf_dir, inputs, args.grad)
        _save_npz_atomic(args.out, outputs)
    except (ParityError, ValueError, KeyError, FileNotFoundError) as e:
        message = str(e)
        if message.startswith("inputs: "):  # runners say "inputs"; the user knows the file by its path
            message = f"--inputs {args.inputs}: {message[len('inputs: '):]}"
        print(f"mm-parity: error: {message}", file=sys.stderr)
        return 2
    print(f"mm-parity: wrote {args.out} ({', '.join(sorted(outputs))})")
    if reference is None:
        return 0
    rows = compare(outputs, reference)
    for key, ok, msg in rows:
        print(f"  {'ok  ' if ok else 'FAIL'} {key}: {msg}")
    if not rows:
        print("mm-parity: no output key is in the reference", file=sys.stderr)
        return 1
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
