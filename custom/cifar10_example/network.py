"""CifarNet: the CIFAR-10 example's network, a small CNN for 3 x 32 x 32 images.

Plain torch: LitCifarNet wraps it for the Lightning jobs; the plain-PyTorch job (PTEngine) and
its server's persistor take it as it is.
"""

import torch
from torch import nn

NUM_CLASSES = 10


class CifarNet(nn.Module):
    """A small CNN for 32x32x3 images: three conv blocks, then two linear layers."""

    def __init__(self, num_classes: int = NUM_CLASSES, init_seed: int | None = None):
        super().__init__()
        # A seeded initial global model makes a federated run reproducible; fork_rng keeps
        # the caller's random state untouched.
        with torch.random.fork_rng(enabled=init_seed is not None):
            if init_seed is not None:
                torch.manual_seed(init_seed)
            self._build(num_classes)

    def _build(self, num_classes: int) -> None:
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 4x4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
