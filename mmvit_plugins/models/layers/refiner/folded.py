"""The refiner at inference (every BatchNorm on running statistics): the BatchNorms folded into
the convs, in chunks of query rows so that the expanded maps never exist whole."""
from typing import List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .stats import BatchNorm, bn_scale_shift
from .tiling import MapLayout, Tiling, piece_maps


def refine_folded(dla: nn.Module, attn: torch.Tensor, mask: Optional[torch.Tensor],
                  out_norm: BatchNorm, scale: float, tiling: Tiling,
                  layout: MapLayout) -> List[torch.Tensor]:
    """``refine`` of ``dla`` (a ``DistributedLocalAttention``) with every BatchNorm on running
    statistics, folded into the convs: ``relu6(W1 a + b1)``, ``relu6(dw(.) + b2)``,
    ``W3 (.) + k a + b3``, in chunks of query rows (with the depthwise conv's halo); on the
    pieces of ``layout`` (the output is masked to zero outside them): [(B, H, L, L)]."""
    h = attn.shape[1]
    e = dla.conv_exp.out_channels
    s1, t1 = bn_scale_shift(dla.bn1)
    s2, t2 = bn_scale_shift(dla.bn2)
    s3, t3 = bn_scale_shift(dla.bn3)
    s4, t4 = bn_scale_shift(out_norm)
    w1 = (dla.conv_exp.weight.view(e, h) * s1[:, None]).t()
    w2 = dla.depth_sep_conv.weight * s2.view(e, 1, 1, 1)
    k = s4 * scale  # out_norm(bn3(y) + a) * scale = k * s3 * y + k * a + bias
    w3 = dla.conv_pro.weight.view(h, e) * (k * s3)[:, None]
    b3 = (k * t3 + t4 * scale).view(h, 1)
    k = k.view(h, 1)
    kernel = dla.depth_sep_conv.kernel_size[0]
    top, bottom = (kernel - 1) // 2, kernel // 2
    pieces = layout.pieces
    keep = None if mask is None else mask.to(attn.dtype)
    out = None if pieces[0].whole else attn.new_zeros(attn.shape)
    for piece, a, keep_p, spans in piece_maps(attn, keep, pieces, e, (top, bottom), tiling):
        b, _, _, n = a.shape
        chunks = []
        for r0, r1, i0, i1 in spans:
            # i0:i1 the rows that the depthwise conv reads
            x = torch.baddbmm(t1, a[:, :, i0:i1].reshape(b, h, -1).transpose(1, 2),
                              w1.expand(b, h, e))
            # hardtanh, not clamp: ReLU6's gradient (zero at the bounds, where maps often are)
            x = F.hardtanh(x, 0., 6., inplace=True).view(b, i1 - i0, n, e)
            if keep_p is not None:  # a float mask: broadcasting masked_fill_ is slow
                x.mul_(keep_p[:, 0, i0:i1, :, None])
            x = F.conv2d(x.permute(0, 3, 1, 2), w2, t2, padding='same', groups=e)
            x = F.hardtanh(x[:, :, r0 - i0:r1 - i0], 0., 6., inplace=True)
            y = torch.addcmul(b3, a[:, :, r0:r1].reshape(b, h, -1), k)
            y = y.baddbmm_(w3.expand(b, h, e), x.reshape(b, e, -1))
            if keep_p is not None:
                y.mul_(keep_p[:, :, r0:r1].reshape(b, 1, -1))
            chunks.append(y.view(b, h, r1 - r0, n))
        y = torch.cat(chunks, dim=2) if len(chunks) > 1 else chunks[0]
        if out is None:
            return [y]
        piece.scatter_(out, y, tiling)
    return [out]
