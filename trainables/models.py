"""The task models. Each takes its inputs as positional tensors and returns logits."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 grey images (scikit-learn's digits): 2 conv + 2 fully connected."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Plan2CNN(nn.Module):
    """Plan 2's CNN: conv32-pool-conv64-pool-fc128-fc{classes} (MNIST or CIFAR-10)."""

    def __init__(self, in_channels: int = 1, size: int = 28, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * (size // 4) ** 2, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Plan1CNN(nn.Module):
    """Plan 1's MNIST CNN: 2 convolutional layers, then 2 fully connected layers."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def reverse_within(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each row's first ``length`` steps along dim 1, leaving its padding in place."""
    steps = torch.arange(x.size(1), device=x.device).unsqueeze(0)
    ends = lengths.to(x.device).unsqueeze(1)
    index = torch.where(steps < ends, ends - 1 - steps, steps)
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))


class TextLSTM(nn.Module):
    """Embedding, an (optionally bidirectional, stacked) LSTM, then a linear classifier.

    Plan 1's IMDB model is one layer; plan 2's is two layers of 128; AG News uses a
    bidirectional layer. Sequences are right-padded, and padding never reaches the
    features the classifier reads: the forward direction is read at each row's last
    real step (what follows it cannot influence it), and the backward direction runs
    over each row's real steps reversed in place, so it starts at the last real token.
    That gives exactly what ``pack_padded_sequence`` gives (the tests compare them),
    without PyTorch's packed backward pass, which on CPU zero-fills a full-size gradient
    at every time step and was 14x slower here.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        *,
        embed_dim: int = 128,
        hidden: int = 128,
        layers: int = 1,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.bidirectional = bidirectional
        if bidirectional:
            # One single-layer LSTM per direction and layer, so that the backward one
            # can run on reversed rows; layer k + 1 reads both directions of layer k.
            sizes = [embed_dim] + [2 * hidden] * (layers - 1)
            self.forward_layers = nn.ModuleList(nn.LSTM(n, hidden, batch_first=True) for n in sizes)
            self.backward_layers = nn.ModuleList(
                nn.LSTM(n, hidden, batch_first=True) for n in sizes
            )
        else:
            self.lstm = nn.LSTM(embed_dim, hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids)
        rows = torch.arange(ids.size(0), device=ids.device)
        last = lengths.to(ids.device) - 1
        if not self.bidirectional:
            out, _ = self.lstm(x)
            return self.fc(out[rows, last])
        for forward_lstm, backward_lstm in zip(
            self.forward_layers, self.backward_layers, strict=True
        ):
            out_f, _ = forward_lstm(x)
            out_b_reversed, _ = backward_lstm(reverse_within(x, lengths))
            x = torch.cat([out_f, reverse_within(out_b_reversed, lengths)], dim=2)
        # the backward direction's final state is its output after the first real token
        return self.fc(torch.cat([out_f[rows, last], out_b_reversed[rows, last]], dim=1))
