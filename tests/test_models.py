"""The text model reads exactly what a packed LSTM reads, without its slow backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainables.models import TextLSTM, reverse_within


def test_reverse_within_keeps_padding_in_place() -> None:
    x = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    assert reverse_within(x, torch.tensor([3, 2])).tolist() == [[3, 2, 1, 0], [5, 4, 0, 0]]


def _packed_reference(model: TextLSTM, layers: int, bidirectional: bool) -> nn.LSTM:
    ref = nn.LSTM(16, 8, num_layers=layers, batch_first=True, bidirectional=bidirectional)
    with torch.no_grad():
        for layer in range(layers):
            if bidirectional:
                pairs = [
                    ("", model.forward_layers[layer]),
                    ("_reverse", model.backward_layers[layer]),
                ]
                for suffix, mine in pairs:
                    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                        getattr(ref, f"{name}_l{layer}{suffix}").copy_(getattr(mine, f"{name}_l0"))
            else:
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(ref, f"{name}_l{layer}").copy_(getattr(model.lstm, f"{name}_l{layer}"))
    return ref


@pytest.mark.parametrize(
    ("layers", "bidirectional"), [(1, False), (2, False), (1, True), (2, True)]
)
def test_matches_pack_padded_sequence(layers: int, bidirectional: bool) -> None:
    torch.manual_seed(0)
    model = TextLSTM(50, 3, embed_dim=16, hidden=8, layers=layers, bidirectional=bidirectional)
    ref = _packed_reference(model, layers, bidirectional)
    lengths = torch.tensor([7, 3, 1, 5])
    ids = torch.randint(2, 50, (4, 7))
    ids[torch.arange(7).unsqueeze(0) >= lengths.unsqueeze(1)] = 0  # right padding
    packed = nn.utils.rnn.pack_padded_sequence(
        model.embedding(ids), lengths, batch_first=True, enforce_sorted=False
    )
    _, (h, _) = ref(packed)
    expected = model.fc(torch.cat([h[-2], h[-1]], dim=1) if bidirectional else h[-1])
    torch.testing.assert_close(model(ids, lengths), expected)
    # and padding is inert: changing what sits in the padding changes nothing
    noisy = ids.clone()
    noisy[ids == 0] = 7
    torch.testing.assert_close(model(noisy, lengths), expected)
