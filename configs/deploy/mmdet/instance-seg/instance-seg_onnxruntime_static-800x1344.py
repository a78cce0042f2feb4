# Mask R-CNN at COCO's test scale: every image is resized (aspect ratio not kept) to
# 800x1344 (H x W).
_base_ = [
    '../_base_/base_instance-seg_static.py',
    '../../_base_/backends/onnxruntime.py'
]

onnx_config = dict(input_shape=(1344, 800))
