#!/usr/bin/env python3
"""Write a tiny random-weight Qwen3 checkpoint that uses trio_router's shipped tokenizer.

Runs in the engine's virtualenv (it needs torch and transformers)::

    python make_model.py --out DIR --tokenizer trio_router/data/qwen3 [--partial-utf8]

No model hub is reachable here, so the conformance suite serves a model made on the spot:
2 layers, hidden size 128, the full Qwen3 vocabulary (151,936 rows), bf16, seeded, so the
same inputs give the same checkpoint. The tokenizer files are copied next to the weights,
which makes engine and router tokenize alike (chat template included).

Random weights produce gibberish, which is fine for protocol and token-exactness tests, but
a few endings are shaped so that tests see realistic answers. Hidden dimension 0 is held at
1.0 in every embedding and no layer writes into it, so column 0 of ``lm_head`` works as a
fixed per-token logit bias:

* ids past the tokenizer's 151,669 and the special tokens ``<|endoftext|>`` ..
  ``<|fim_pad|>`` except ``<|im_end|>`` get -30: never sampled, as in a trained model
  (``<think>`` and ``</think>``, plain added tokens, stay possible);
* ``<|im_end|>`` gets ``--eos-bias`` and its row is multiplied by ``--eos-gain``, so that
  some answers end on it (greedy ones too) and others run to their token budget;
* tokens whose bytes are only part of a UTF-8 character get -30 too, unless
  ``--partial-utf8`` is given: a random model otherwise strings such pieces together far
  more often than a trained one, and a lone piece shows as U+FFFD in the engine's text.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

VOCAB_ROWS = 151_936  # Qwen3's embedding rows (the tokenizer defines 151,669 of them)
FIRST_SPECIAL = 151_643  # <|endoftext|>, the first added token
IM_END = 151_645
THINK = 151_667  # <think> and </think> (151,668), the last added tokens, are not special
TOKENIZER_SIZE = 151_669
NEVER = -30.0


def byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character that stands for each byte."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def partial_character_ids(tokenizer_json: Path) -> list[int]:
    """Ids whose bytes do not decode as UTF-8 on their own (pieces of a character)."""
    alphabet = byte_of_char()
    vocab = json.loads(tokenizer_json.read_text())["model"]["vocab"]
    pieces = []
    for piece, token_id in vocab.items():
        try:
            bytes(alphabet[c] for c in piece).decode("utf-8")
        except UnicodeDecodeError:
            pieces.append(token_id)
    return pieces


def build(out: Path, tokenizer: Path, eos_bias: float, eos_gain: float, partial: bool) -> int:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB_ROWS,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=False,
        bos_token_id=FIRST_SPECIAL,
        eos_token_id=IM_END,
        torch_dtype="bfloat16",
    )
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() >= 2:
                weight.normal_(0.0, 0.08)
        model.model.embed_tokens.weight[:, 0] = 1.0  # the bias channel ...
        for layer in model.model.layers:  # ... that no layer writes to
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        bias = model.lm_head.weight[:, 0]
        bias.zero_()
        bias[FIRST_SPECIAL:THINK] = NEVER
        bias[TOKENIZER_SIZE:] = NEVER
        bias[IM_END] = eos_bias
        if not partial:
            bias[partial_character_ids(tokenizer / "tokenizer.json")] = NEVER
        model.lm_head.weight[IM_END, 1:] *= eos_gain  # its logit swings with the context
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, out / name)
    generation = {"bos_token_id": FIRST_SPECIAL, "eos_token_id": [IM_END, FIRST_SPECIAL]}
    (out / "generation_config.json").write_text(json.dumps({**generation, "pad_token_id": 151643}))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write")
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer files")
    parser.add_argument("--eos-bias", type=float, default=5.0, help="logit bias of <|im_end|>")
    parser.add_argument("--eos-gain", type=float, default=2.0, help="scale of its lm_head row")
    parser.add_argument(
        "--partial-utf8", action="store_true", help="let pieces of a character be sampled"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    size = build(args.out, args.tokenizer, args.eos_bias, args.eos_gain, args.partial_utf8)
    print(f"wrote {args.out} ({size:,} parameters)")


if __name__ == "__main__":
    main()
