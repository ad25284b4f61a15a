from __future__ import annotations

import math

import torch

from model.evaluate import evaluate_text
from model.lstm import LSTMLanguageModel, ModelConfig
from model.tokenizer import CharTokenizer


def test_uniform_model_scores_log_vocab() -> None:
    """With every weight zero the model predicts uniformly: exactly ln(V) nats per character."""
    tok = CharTokenizer.train(["abcdefgh"])
    model = LSTMLanguageModel(ModelConfig(vocab_size=tok.vocab_size, embed_dim=4, hidden_size=8, num_layers=2))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    result = evaluate_text(model, tok, "abcabc")
    assert result.num_chars == 6 and result.num_tokens == 6  # the first character is scored too
    assert math.isclose(result.nats_per_char, math.log(tok.vocab_size), rel_tol=1e-6)
    assert math.isclose(result.bits_per_char, math.log2(tok.vocab_size), rel_tol=1e-6)
    assert math.isclose(result.token_perplexity, tok.vocab_size, rel_tol=1e-5)


def test_known_distribution() -> None:
    """Bias-only output layer: p(token) = softmax(bias), so the loss is a hand-computable sum."""
    tok = CharTokenizer.train(["ab"])  # ids: <s>=0 <unk>=1 a=2 b=3
    model = LSTMLanguageModel(ModelConfig(vocab_size=4, embed_dim=2, hidden_size=3, num_layers=1))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.decoder.bias.copy_(torch.tensor([0.0, 0.0, math.log(3.0), 0.0]))  # p(a) = 3/6, p(b) = 1/6
    result = evaluate_text(model, tok, "aab")
    expected = -(2 * math.log(0.5) + math.log(1 / 6)) / 3
    assert math.isclose(result.nats_per_char, expected, rel_tol=1e-6)


def test_unknown_characters_reported(char_lm) -> None:  # type: ignore[no-untyped-def]
    result = evaluate_text(char_lm.model, char_lm.tokenizer, "hello 世界")
    assert result.unknown_chars == 2 and result.num_chars == 8


def test_state_is_carried_across_chunks(char_lm) -> None:  # type: ignore[no-untyped-def]
    from model.evaluate import stream_nll

    text = "To be, or not to be, that is the question:\n" * 5
    ids = torch.tensor([0, *char_lm.tokenizer.encode(text)])
    whole, n = stream_nll(char_lm.model, ids, chunk=10_000)
    chunked, m = stream_nll(char_lm.model, ids, chunk=7)
    assert n == m == len(text)
    assert math.isclose(whole, chunked, rel_tol=1e-5)
