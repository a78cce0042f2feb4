"""mmvit-plugins: BOAT, MAFormer and Refiner-ViT backbones for MMDetection and MMSegmentation.

Importing the package registers every backbone (and the layer-decay optimizer constructor) in
mmengine's root registries, so mmdet's and mmseg's ``MODELS.build`` find them by type name.
When mmdeploy is already imported (its tools import it before they read a model config), the
package's mmdeploy rewriters are registered too; mmdeploy itself is optional.
"""
import sys

from . import engine, models, optim  # noqa: F401  (registration happens at import)
from .models import timm_models  # noqa: F401  (registers the timm models)
from .utils.onnx_symbolics import register_onnx_symbolics
from .version import __version__

register_onnx_symbolics()
if 'mmdeploy' in sys.modules:
    from .deployment import rewriters  # noqa: F401

__all__ = ['__version__']
