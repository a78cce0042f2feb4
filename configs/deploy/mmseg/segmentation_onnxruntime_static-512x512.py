# The ADE20K crop size: every image is resized (aspect ratio not kept) to 512x512.
_base_ = ['./segmentation_static.py', '../_base_/backends/onnxruntime.py']

onnx_config = dict(input_shape=[512, 512])
