"""A small Fashion-MNIST CNN whose penultimate features score generated images.

Inception features were learnt on ImageNet photographs; a network trained on Fashion-MNIST itself
sees the differences that matter for 28x28 clothes (the idea behind Kernel/Frechet distances in
domain-specific features). `FashionCNN.features` maps uint8 images to 128-d vectors, so it plugs
into evaluate_fid.compute_statistics like the Inception network does.
"""

import torch
from torch import nn
from torch.nn import functional as F

FEATURE_DIM = 128


class ToUnitRange(nn.Module):
    """uint8 images in [0, 255] -> float in [-1, 1], as train.py normalises them."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() / 127.5 - 1


class FashionCNN(nn.Module):
    """Two conv + pool stages and a 128-d hidden layer (the features), then the 10-way head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            ToUnitRange(),
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 28 -> 14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 14 -> 7
            nn.Flatten(), nn.Linear(64 * 7 * 7, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 1,
                     batch_size: int = 128, lr: float = 1e-3, seed: int = 0) -> FashionCNN:
    """Adam on uint8 images (N, 1, 28, 28) and labels (N,); returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = FashionCNN(int(labels.max()) + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.inference_mode()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 500) -> float:
    """Fraction of images (uint8, N x 1 x 28 x 28) whose predicted class is the label."""
    correct = sum((model(x).argmax(1) == y).sum().item()
                  for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True))
    return correct / len(images)
