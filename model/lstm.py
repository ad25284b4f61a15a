"""Embedding -> stacked LSTM -> (optionally tied) output projection, with AWD-LSTM regularisers.

    ids (B, T) ─▶ embedding (B, T, E) ─▶ LSTM_1 ─▶ ... ─▶ LSTM_L (B, T, H_L) ─▶ linear (B, T, V)

Each layer is its own single-layer nn.LSTM so that dropout between layers can be *locked*
(one mask for all time steps of a sequence) and hidden-to-hidden weights can be DropConnected;
both are what matters most on a corpus as small as Tiny Shakespeare (Merity et al., 2017).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .options import option

# One (h, c) pair per layer, each (B, H_layer). Layers may differ in width (tied weights).
State = tuple[tuple[Tensor, Tensor], ...]


DROPOUT_MODES = ("locked", "ordinary")
INIT_SCHEMES = ("forget_bias", "pytorch")


@dataclass(kw_only=True)
class ModelHyperparameters:
    """The network's shape and regularisers: everything but the vocabulary, which the tokenizer
    decides. Declared once: `lstm-lm train` derives its flags from these fields."""

    embed_dim: int = option(128, "embedding width", group="model")
    hidden_size: int = option(512, "LSTM width", group="model")
    num_layers: int = option(3, "stacked LSTM layers", group="model")
    tie_weights: bool = option(
        False, "share embedding and output matrices (the last layer becomes --embed-dim wide)", group="model"
    )
    dropout_embed: float = option(0.0, "drop whole vocabulary rows of the embedding (AWD dropoute)", group="model")
    dropout_input: float = option(0.1, "dropout on the embeddings fed to layer 1", group="model")
    dropout_hidden: float = option(0.2, "dropout between LSTM layers", group="model")
    dropout_output: float = option(0.2, "dropout on the last layer's output", group="model")
    dropout_mode: str = option(
        "locked",
        "locked: one mask per sequence shared over time (AWD-LSTM); ordinary: a new mask at every step",
        group="model",
        choices=DROPOUT_MODES,
    )
    weight_drop: float = option(0.2, "DropConnect on hidden-to-hidden weights", group="model")

    def __post_init__(self) -> None:
        if self.embed_dim < 1 or self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError(f"invalid model size in {self}")
        for name in ("dropout_embed", "dropout_input", "dropout_hidden", "dropout_output", "weight_drop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1)")
        if self.dropout_mode not in DROPOUT_MODES:
            raise ValueError(f"dropout_mode must be one of {DROPOUT_MODES}")

    def hyperparameters(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(ModelHyperparameters)}


@dataclass(kw_only=True)
class ModelConfig(ModelHyperparameters):
    """Everything needed to rebuild the network; stored in the checkpoint's config.json."""

    vocab_size: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vocab_size < 3:
            raise ValueError(f"vocab_size must be at least 3 (<s>, <unk> and one more), not {self.vocab_size}")

    @property
    def layer_sizes(self) -> list[int]:
        """Hidden width of each layer; the last matches the embedding when weights are tied."""
        sizes = [self.hidden_size] * self.num_layers
        if self.tie_weights:
            sizes[-1] = self.embed_dim
        return sizes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)


def locked_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout with one mask per sequence shared over time. x: (B, T, D)."""
    if not training or p == 0.0:
        return x
    mask = x.new_empty(x.size(0), 1, x.size(2)).bernoulli_(1 - p) / (1 - p)
    return x * mask


class LSTMLanguageModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim)
        sizes = config.layer_sizes
        inputs = [config.embed_dim, *sizes[:-1]]
        self.layers = nn.ModuleList(nn.LSTM(i, h, num_layers=1, batch_first=True) for i, h in zip(inputs, sizes))
        self.decoder = nn.Linear(sizes[-1], config.vocab_size)
        if config.tie_weights:
            self.decoder.weight = self.embedding.weight
        self.initialize("forget_bias")

    def initialize(self, scheme: str = "forget_bias") -> None:
        """(Re)initialise every weight. "pytorch": each module's own default (nn.LSTM's uniform
        +-1/sqrt(H) for weights and biases alike). "forget_bias": N(0, 1) embeddings, zero biases
        but the forget gate's at 1."""
        if scheme not in INIT_SCHEMES:
            raise ValueError(f"init scheme must be one of {INIT_SCHEMES}")
        if scheme == "pytorch":
            for module in (self.embedding, *self.layers, self.decoder):
                module.reset_parameters()
            if self.config.tie_weights:
                self.decoder.weight = self.embedding.weight
            return
        # N(0, 1) as nn.Embedding does: a +-0.1 table left a 3-layer stack on the unigram
        # plateau (~3.3 nats) for hundreds of steps in our runs. A tied table is also the output
        # layer, where N(0, 1) would give logits of std ~sqrt(E): scale it down there.
        std = self.config.embed_dim**-0.5 if self.config.tie_weights else 1.0
        nn.init.normal_(self.embedding.weight, 0.0, std)
        nn.init.zeros_(self.decoder.bias)
        for layer in self.layers:
            # Forget-gate bias 1: gradients survive long spans early in training.
            for name, p in layer.named_parameters():
                if name.startswith("bias_ih"):
                    h = p.numel() // 4
                    with torch.no_grad():
                        p.zero_()
                        p[h : 2 * h].fill_(1.0)
                elif name.startswith("bias_hh"):
                    nn.init.zeros_(p)

    def init_state(self, batch_size: int) -> State:
        """Zero state; built from a weight so it has the model's dtype and device."""
        w = self.embedding.weight
        return tuple((w.new_zeros(batch_size, h), w.new_zeros(batch_size, h)) for h in self.config.layer_sizes)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def lstm(self, index: int) -> nn.LSTM:
        """Layer `index` as its concrete type (ModuleList items are typed as Module)."""
        return cast(nn.LSTM, self.layers[index])

    def _embed(self, ids: Tensor) -> Tensor:
        weight = self.embedding.weight
        p = self.config.dropout_embed
        if self.training and p > 0:
            mask = weight.new_empty(weight.size(0), 1).bernoulli_(1 - p) / (1 - p)
            weight = weight * mask
        return F.embedding(ids, weight)

    def _run_layer(self, index: int, x: Tensor, hc: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        layer = self.lstm(index)
        h0, c0 = hc[0].unsqueeze(0), hc[1].unsqueeze(0)  # nn.LSTM wants (1, B, H)
        p = self.config.weight_drop
        if self.training and p > 0:
            # DropConnect: one mask on W_hh for the whole window, substituted without
            # touching the stored parameter (gradients still reach it through the mask).
            dropped = F.dropout(lstm_weights(layer)[1], p, True)
            out, (h, c) = functional_call(layer, {"weight_hh_l0": dropped}, (x, (h0, c0)))
        else:
            out, (h, c) = layer(x, (h0, c0))
        return out, (h.squeeze(0), c.squeeze(0))

    def hidden(self, ids: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """ids (B, T) -> top-layer outputs (B, T, H_L) and the state after the last position."""
        if state is None:
            state = self.init_state(ids.size(0))
        cfg = self.config
        drop = locked_dropout if cfg.dropout_mode == "locked" else F.dropout
        x = drop(self._embed(ids), cfg.dropout_input, self.training)  # (B, T, E)
        new_state = []
        last = len(self.layers) - 1
        for i in range(len(self.layers)):
            x, hc = self._run_layer(i, x, state[i])  # (B, T, H_i)
            new_state.append(hc)
            p = cfg.dropout_output if i == last else cfg.dropout_hidden
            x = drop(x, p, self.training)
        return x, tuple(new_state)

    def forward(self, ids: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """ids (B, T) -> logits (B, T, V) and the state after the last position."""
        x, new_state = self.hidden(ids, state)
        return self.decoder(x), new_state


def lstm_weights(layer: nn.LSTM) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(W_ih (4H, I), W_hh (4H, H), b_ih, b_hh) of a single-layer nn.LSTM; gates ordered i, f, g, o."""
    names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    w_ih, w_hh, b_ih, b_hh = (layer.get_parameter(n) for n in names)
    return w_ih, w_hh, b_ih, b_hh


def detach_state(state: State) -> State:
    """Cut the graph between BPTT windows while keeping the values."""
    return tuple((h.detach(), c.detach()) for h, c in state)


def state_size(config: ModelConfig) -> int:
    """Floats in one sequence's state: h and c for every layer."""
    return 2 * sum(config.layer_sizes)


def flatten_state(state: State) -> Tensor:
    """State -> (B, state_size) with layout [h_1, ..., h_L, c_1, ..., c_L].

    All h first: then the decode step's layer-l input [h_(l-1), h_l] is one contiguous slice
    (model/fused.py), and a session's stored bytes are the decode step's own layout."""
    return torch.cat([hc[0] for hc in state] + [hc[1] for hc in state], dim=1)


def unflatten_state(flat: Tensor, config: ModelConfig) -> State:
    """(B, state_size) -> State; the inverse of flatten_state (views into `flat`)."""
    if flat.dim() != 2 or flat.size(1) != state_size(config):
        raise ValueError(f"state of shape {tuple(flat.shape)} does not fit this model ({state_size(config)} floats)")
    sizes = config.layer_sizes
    c_at = sum(sizes)
    out = []
    offset = 0
    for h in sizes:
        out.append((flat[:, offset : offset + h], flat[:, c_at + offset : c_at + offset + h]))
        offset += h
    return tuple(out)
