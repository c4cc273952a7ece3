"""tumorseg: brain-tumour segmentation in MRI with a U-Net trained with the Dice loss."""

from tumorseg.checkpoint import load_model
from tumorseg.config import InferenceConfig
from tumorseg.inference import Predictor
from tumorseg.model import UNet
from tumorseg.version import __version__

__all__ = ["InferenceConfig", "Predictor", "UNet", "load_model", "__version__"]
