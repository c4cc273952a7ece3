"""tumorseg: brain-tumour segmentation in MRI with a U-Net trained with the Dice loss."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tumorseg")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from tumorseg.checkpoint import load_model  # noqa: E402
from tumorseg.config import InferenceConfig  # noqa: E402
from tumorseg.inference import Predictor  # noqa: E402
from tumorseg.model import UNet  # noqa: E402

__all__ = ["InferenceConfig", "Predictor", "UNet", "load_model", "__version__"]
