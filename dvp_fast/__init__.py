"""dvp_fast: a fast, tested implementation of DVP-VAE.

    import dvp_fast
    model = dvp_fast.DVPVAE.from_preset("mnist")
    out = model(x)                 # x in [-1, 1], (B, 1, 28, 28); out.loss is bits/dim
    images = model.sample(16)      # 50 diffusion steps for u, then the top-down decoder
"""
from . import data, ops
from .config import PRESETS, DVPConfig, TrainConfig, model_preset, train_preset
from .model import DVPVAE, DVPOutput, Encoding

__version__ = "0.1.0"

__all__ = ["data", "ops", "DVPVAE", "DVPConfig", "DVPOutput", "Encoding", "TrainConfig", "PRESETS", "model_preset",
           "train_preset", "__version__"]
