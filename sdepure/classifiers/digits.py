"""A small CNN classifier for the 8x8 digits; input [0, 1] images (N, 1, 8, 8)."""
from __future__ import annotations

from torch import nn


class DigitsCNN(nn.Module):
    def __init__(self, ch: int = 32, num_classes: int = 10):
        super().__init__()
        self.config = {"ch": ch, "num_classes": num_classes}
        self.features = nn.Sequential(
            nn.Conv2d(1, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU(),
            nn.Conv2d(ch, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(ch, 2 * ch, 3, padding=1), nn.BatchNorm2d(2 * ch), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * ch * 4, num_classes))

    def forward(self, x):
        return self.head(self.features(x))
