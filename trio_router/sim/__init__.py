"""Simulated SGLang worker for demos, tests and benchmarks without GPUs."""

from .generation import Decoder, Finish, Vocab, generate, next_token, vocab_from_tokenizer
from .tokenizer import ByteTokenizer, TokenizerLike
from .worker import (
    Faults,
    SimStats,
    SimWorker,
    SimWorkerConfig,
    SimWorkerHandle,
    serve_sim_worker,
)

__all__ = [
    "ByteTokenizer",
    "Decoder",
    "Faults",
    "Finish",
    "SimStats",
    "SimWorker",
    "SimWorkerConfig",
    "SimWorkerHandle",
    "TokenizerLike",
    "Vocab",
    "generate",
    "next_token",
    "serve_sim_worker",
    "vocab_from_tokenizer",
]
