"""An LSTM language model: tokenizers, network, training, evaluation, sampling, checkpoints.

Importable without a server: nothing here knows about Flask or Redis.

    from model import load
    lm = load("model/checkpoints/shakespeare-char")
    ids = lm.tokenizer.encode("ROMEO:")
    logits, state = lm.model(torch.tensor([ids]), None)
"""

from .checkpoint import CheckpointError, LanguageModel, load, save_checkpoint
from .lstm import LSTMLanguageModel, ModelConfig, State
from .tokenizer import BOS_ID, UNK_ID, CharTokenizer, SentencePieceTokenizer, Tokenizer

__all__ = [
    "BOS_ID",
    "UNK_ID",
    "CharTokenizer",
    "CheckpointError",
    "LSTMLanguageModel",
    "LanguageModel",
    "ModelConfig",
    "SentencePieceTokenizer",
    "State",
    "Tokenizer",
    "load",
    "save_checkpoint",
]
