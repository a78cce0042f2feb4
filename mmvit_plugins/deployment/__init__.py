"""Deployment with mmdeploy: exact exports of what mmdeploy's rewrites get wrong.

``pooling`` needs torch only; ``rewriters`` registers mmdeploy rewriters and needs mmdeploy
(``pip install mmvit-plugins[deploy]``). ``agreement`` compares a PyTorch model with its
exported backend model.
"""
from .pooling import adaptive_bins, exact_adaptive_avg_pool2d

__all__ = ['adaptive_bins', 'exact_adaptive_avg_pool2d']
