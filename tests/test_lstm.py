from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from model import BOS_ID
from model.engine import SHORT_PREFILL, Engine, greedy_steps
from model.lstm import LSTMLanguageModel, ModelConfig, flatten_state, state_size, unflatten_state


def make_model(**kw: object) -> LSTMLanguageModel:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"vocab_size": 50, "embed_dim": 12, "hidden_size": 20, "num_layers": 3, **kw})  # type: ignore[arg-type]
    return LSTMLanguageModel(cfg).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_shapes(tie: bool) -> None:
    model = make_model(tie_weights=tie)
    logits, state = model(torch.randint(0, 50, (4, 7)))
    assert logits.shape == (4, 7, 50)
    assert len(state) == 3
    assert [h.shape for h, _ in state] == [(4, 20), (4, 20), (4, 12 if tie else 20)]
    if tie:
        assert model.decoder.weight is model.embedding.weight


def test_step_by_step_equals_whole_sequence() -> None:
    model = make_model()
    ids = torch.randint(0, 50, (2, 25))
    with torch.no_grad():
        whole, whole_state = model(ids)
        state = None
        steps = []
        for t in range(ids.size(1)):
            out, state = model(ids[:, t : t + 1], state)
            steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=0, atol=1e-5)
    for (h1, c1), (h2, c2) in zip(state, whole_state):  # type: ignore[arg-type]
        torch.testing.assert_close(h1, h2, rtol=0, atol=1e-5)
        torch.testing.assert_close(c1, c2, rtol=0, atol=1e-5)


def test_chunks_with_carried_state_equal_one_call() -> None:
    model = make_model()
    ids = torch.randint(0, 50, (1, 40))
    with torch.no_grad():
        whole, _ = model(ids)
        a, st = model(ids[:, :13])
        b, st = model(ids[:, 13:31], st)
        c, _ = model(ids[:, 31:], st)
    torch.testing.assert_close(torch.cat([a, b, c], dim=1), whole, rtol=0, atol=1e-5)


def test_regularisers_only_act_in_training() -> None:
    model = make_model(dropout_embed=0.3, dropout_input=0.3, dropout_hidden=0.3, dropout_output=0.3, weight_drop=0.5)
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        e1, _ = model(ids)
        e2, _ = model(ids)
        model.train()
        t1, _ = model(ids)
        t2, _ = model(ids)
    assert torch.equal(e1, e2)
    assert not torch.allclose(t1, t2)


def test_weight_drop_keeps_parameters_and_gradients() -> None:
    model = make_model(weight_drop=0.5).train()
    before = model.layers[0].weight_hh_l0.detach().clone()
    logits, _ = model(torch.randint(0, 50, (2, 6)))
    logits.sum().backward()
    assert torch.equal(model.layers[0].weight_hh_l0.detach(), before)  # the mask is not written back
    assert model.layers[0].weight_hh_l0.grad is not None
    assert model.layers[0].weight_hh_l0.grad.abs().sum() > 0


def test_state_flatten_round_trip() -> None:
    model = make_model(tie_weights=True)
    _, state = model(torch.randint(0, 50, (3, 4)))
    flat = flatten_state(state)
    assert flat.shape == (3, state_size(model.config))
    for (h1, c1), (h2, c2) in zip(unflatten_state(flat, model.config), state):
        assert torch.equal(h1, h2) and torch.equal(c1, c2)
    with pytest.raises(ValueError, match="does not fit"):
        unflatten_state(flat[:, :-1], model.config)


@pytest.mark.parametrize("tie", [False, True])
def test_engine_step_matches_nn_lstm(tie: bool) -> None:
    """The fused numpy step must give nn.LSTM's log-probabilities (max |Δ| <= 1e-4, fp32)."""
    model = make_model(tie_weights=tie, hidden_size=64, embed_dim=32)
    engine = Engine(model)
    ids = torch.randint(2, 50, (3, 30))
    with torch.no_grad():
        start = unflatten_state(torch.from_numpy(engine.start(3)), model.config)
        reference, _ = model(ids, start)
    ref_logp = torch.log_softmax(reference.double(), dim=-1).numpy()
    rows = engine.start(3)
    worst = 0.0
    for t in range(ids.size(1)):
        rows = engine.step(ids[:, t].numpy(), rows)
        worst = max(worst, float(np.abs(engine.log_probs(rows) - ref_logp[:, t]).max()))
    assert worst <= 1e-4


@pytest.mark.parametrize("n", [1, SHORT_PREFILL - 1, SHORT_PREFILL, 120])
def test_engine_prefill_matches_steps(n: int) -> None:
    """Short prompts go through fused steps, long ones through nn.LSTM calls: same result."""
    model = make_model()
    engine = Engine(model)
    ids = [2 + (i * 7) % 48 for i in range(n)]
    a = engine.prefill(ids, engine.start())
    b = engine.start()
    for i in ids:
        b = engine.step(np.array([i]), b)
    with torch.no_grad():
        start = unflatten_state(torch.from_numpy(engine.start()), model.config)
        c = flatten_state(model.hidden(torch.tensor([ids]), start)[1]).numpy()  # always the whole-sequence path
    assert np.abs(engine.log_probs(a) - engine.log_probs(b)).max() <= 1e-4
    assert np.abs(engine.log_probs(a) - engine.log_probs(c)).max() <= 1e-4


def test_windowed_prefill_and_score_are_bit_identical_to_one_call() -> None:
    """Long texts go through nn.LSTM in windows carrying the state (bounded memory): the rows and
    the scores must be exactly those of a single call over the whole text."""
    model = make_model()
    ids = [2 + (i * 13) % 48 for i in range(700)]
    whole, windowed = Engine(model, window=100_000), Engine(model, window=128)
    start = whole.start()
    assert np.array_equal(whole.prefill(ids, start), windowed.prefill(ids, start))
    (s1, r1), (s2, r2) = whole.score(ids, start), windowed.score(ids, start)
    assert np.array_equal(s1, s2) and np.array_equal(r1, r2)


def test_rows_stepped_together_equal_each_alone() -> None:
    engine = Engine(make_model())
    r1 = engine.prefill([5, 6, 7], engine.start())
    r2 = engine.prefill([9], engine.start())
    before = np.concatenate([r1, r2])
    kept = before.copy()
    batched = engine.step(np.array([3, 4]), before)
    alone = engine.step(np.array([4]), r2)
    assert np.abs(engine.logits(batched[1:]) - engine.logits(alone)).max() <= 1e-5
    assert batched.shape == (2, engine.state_size) == (2, state_size(engine.config))
    assert np.array_equal(before, kept)  # the input rows are not modified


def test_batch_sizes_met_in_any_order_share_one_thread_buffer() -> None:
    """A thread steps batches of growing and shrinking sizes: every result equals its rows stepped
    alone, results already returned stay as they were, and the thread holds one set of buffers
    sized for its largest batch, not one per size."""
    engine = Engine(make_model())
    rng = np.random.default_rng(0)
    rows = np.concatenate([engine.prefill([int(t)], engine.start()) for t in rng.integers(2, 50, 16)])
    ids = rng.integers(2, 50, 16)
    alone = np.concatenate([engine.step(ids[i : i + 1], rows[i : i + 1]) for i in range(16)])
    returned = []
    for batch in (3, 16, 2, 9, 16, 1, 5, 6, 13, 7):  # 6, 7 and 13 are padded (fused.BLOCK)
        got = engine.step(ids[:batch], rows[:batch])
        assert np.abs(got - alone[:batch]).max() <= 1e-5, batch
        returned.append((batch, got, got.copy()))
    for batch, got, copy in returned:
        assert np.array_equal(got, copy), f"the result for batch {batch} was overwritten"
    fused = engine._fused
    assert fused is not None
    capacity = fused._local.capacity
    assert 16 <= capacity <= 32 and fused._local.buf.shape[0] == capacity
    assert all(ws.buf.base is fused._local.buf for ws in fused._local.spaces.values())


def test_engine_score_matches_token_by_token() -> None:
    model = make_model()
    engine = Engine(model)
    ids = [5, 9, 2, 33, 17, 8]
    rows = engine.prefill([3, 4], engine.start())
    scores, after = engine.score(ids, rows)
    expected = []
    st = rows
    for i in ids:
        expected.append(float(engine.log_probs(st)[0, i]))
        st = engine.step(np.array([i]), st)
    assert np.allclose(scores, expected, atol=1e-5)
    assert np.abs(engine.log_probs(after) - engine.log_probs(st)).max() <= 1e-4


def test_greedy_steps_follow_nn_lstm_argmax() -> None:
    model = make_model()
    engine = Engine(model)
    tokens = greedy_steps(engine, 12, first=5)
    ids = [BOS_ID, 5]
    with torch.no_grad():
        for _ in range(12):
            logits, _ = model(torch.tensor([ids]), None)
            ids.append(int(logits[0, -1].argmax()))
    assert tokens == ids[2:]


class _PlainLSTM(nn.Module):
    """A textbook char-LSTM: embedding, dropout, one multi-layer nn.LSTM with dropout between
    layers, dropout, linear (the shape of ../shared/reference's script)."""

    def __init__(self, vocab: int, embed: int, hidden: int, layers: int, p: float):
        super().__init__()
        self.emb = nn.Embedding(vocab, embed)
        self.rnn = nn.LSTM(embed, hidden, layers, dropout=p, batch_first=True)
        self.drop = nn.Dropout(p)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(self.drop(self.emb(x)))
        return self.out(self.drop(y))  # type: ignore[no-any-return]


def test_ordinary_dropout_model_trains_exactly_like_a_plain_multilayer_lstm() -> None:
    """With the same weights and the same RNG, our per-layer model with --dropout-mode ordinary
    follows the plain nn.LSTM model step for step: the model is not where a training gap hides."""
    torch.manual_seed(0)
    plain = _PlainLSTM(30, 12, 24, 2, 0.25)
    ours = make_model(
        vocab_size=30, embed_dim=12, hidden_size=24, num_layers=2, weight_drop=0.0, dropout_mode="ordinary",
        dropout_input=0.25, dropout_hidden=0.25, dropout_output=0.25,
    ).train()  # fmt: skip
    with torch.no_grad():
        ours.embedding.weight.copy_(plain.emb.weight)
        ours.decoder.weight.copy_(plain.out.weight)
        ours.decoder.bias.copy_(plain.out.bias)
        for layer in range(2):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(ours.layers[layer], f"{name}_l0").copy_(getattr(plain.rnn, f"{name}_l{layer}"))
    models = (plain, ours)
    optims = [torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.01) for m in models]
    x = torch.randint(0, 30, (4, 17))
    for step in range(4):
        losses = []
        for m, opt in zip(models, optims):
            torch.manual_seed(100 + step)  # the same dropout masks for both
            out = m(x[:, :-1])
            logits = out[0] if isinstance(out, tuple) else out
            loss = nn.functional.cross_entropy(logits.reshape(-1, 30), x[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], abs=1e-6)
