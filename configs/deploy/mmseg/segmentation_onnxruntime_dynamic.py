# Any input size (batch, height and width are dynamic axes); traced at the export image's size.
_base_ = ['./segmentation_dynamic.py', '../_base_/backends/onnxruntime.py']
