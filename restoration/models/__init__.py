"""Model families and the explicit table the checkpoint loader builds from.

`MODELS` maps a model kind (the `"kind"` stored in a model file) to its (config dataclass, module class). Adding a
family is one line here; nothing is discovered by file name.
"""

from restoration.models.classifier import Classifier, ClassifierConfig
from restoration.models.dcgan import DCGAN, DCGANConfig
from restoration.models.inpainter import Inpainter, InpainterConfig
from restoration.models.repairer import Repairer, RepairerConfig
from restoration.models.restorer import Restorer, RestorerConfig
from restoration.models.upscaler import Upscaler, UpscalerConfig
from restoration.models.vae import VAE, VAEConfig

MODELS: dict[str, tuple[type, type]] = {
    "restorer": (RestorerConfig, Restorer),
    "dcgan": (DCGANConfig, DCGAN),
    "vae": (VAEConfig, VAE),
    "classifier": (ClassifierConfig, Classifier),
    "upscaler": (UpscalerConfig, Upscaler),
    "inpainter": (InpainterConfig, Inpainter),
    "repairer": (RepairerConfig, Repairer),
}

__all__ = ["MODELS", "Restorer", "RestorerConfig"]
