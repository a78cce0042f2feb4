# ONNX export settings, as mmdeploy's configs/_base_/onnx_config.py but at opset 17 (torch 2.4's
# default) instead of 11: from opset 16 on, mmdeploy exports mmcv's aligned RoIAlign as ONNX
# RoiAlign with coordinate_transformation_mode='half_pixel', which equals it; below, it shifts
# the RoIs and onnxruntime then widens RoIs smaller than one feature pixel to one (Mask R-CNN
# scores off by 2e-3). input_shape is (W, H).
onnx_config = dict(
    type='onnx',
    export_params=True,
    keep_initializers_as_inputs=False,
    opset_version=17,
    save_file='end2end.onnx',
    input_names=['input'],
    output_names=['output'],
    input_shape=None,
    optimize=True)
