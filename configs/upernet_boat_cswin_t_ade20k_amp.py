"""UperNet + BOAT-CSWin-T on ADE20K (as upernet_boat_cswin_t_ade20k.py) with mixed precision.

mmengine's AmpOptimWrapper: float16 autocast with a dynamic loss scale on CUDA (any GPU; set
``dtype='bfloat16'`` on GPUs that have it to drop the loss scale). tools/train.py runs it on a
machine without CUDA as CPUAmpOptimWrapper, in bfloat16 (the only CPU autocast dtype).
"""
_base_ = ['./upernet_boat_cswin_t_ade20k.py']
optim_wrapper = dict(type='AmpOptimWrapper', dtype='float16', loss_scale='dynamic')
