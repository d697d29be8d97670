"""train.py with its random training draws replaced by functions of the images, so that a run's
result depends only on which images each step sees, not on which process draws what: then a
2-process run must equal a 1-process run at the same global batch (tests/test_train_options.py).

    accelerate launch ... tests/deterministic_train.py <train.py options>
"""

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by the launcher

import train  # noqa: E402
from diffusion import RectifiedFlow  # noqa: E402


class ImageDrivenFlow(RectifiedFlow):
    """Rectified flow whose time and noise for an image are fixed functions of its pixels."""

    def training_losses(self, model, x, model_kwargs=None, noise=None):
        self.times = torch.sigmoid(10 * x.mean(dim=(1, 2, 3)))
        return super().training_losses(model, x, model_kwargs, noise=torch.sin(1000 * x))

    def sample_timesteps(self, batch_size, device):
        return self.times


def make_deterministic(set_attribute: Callable[[str, object], None]) -> None:
    """Replace train.py's random flips and objective (set_attribute(name, value) on `train`)."""
    set_attribute("random_flip", lambda x: x)
    set_attribute("create_objective", lambda args: (ImageDrivenFlow(), RectifiedFlow()))


if __name__ == "__main__":
    make_deterministic(lambda name, value: setattr(train, name, value))
    train.save_grid = lambda *args: None  # the final sample grid is not compared, only its cost
    train.main(train.parse_args(sys.argv[1:]))
