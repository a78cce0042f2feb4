_base_ = ['./base_static.py']

onnx_config = dict(output_names=['dets', 'labels', 'masks'])
# The graph returns each detection's 28x28 mask; pasting into the image happens outside it.
codebase_config = dict(post_processing=dict(export_postprocess_mask=False))
