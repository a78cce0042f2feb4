# Mask R-CNN at any input size (batch, height, width and the number of detections are dynamic).
_base_ = [
    '../_base_/base_instance-seg_dynamic.py',
    '../../_base_/backends/onnxruntime.py'
]
