"""The refiner in training with every BatchNorm on batch statistics, as an autograd Function
that runs in chunks of query rows, so that the expanded maps never exist whole.

Notation of the passes (one map per step of the refiner, B x C x L x L):
``a`` the input map; ``y1 = conv_exp(a)``, ``x1 = relu6(bn1(y1))`` (masked);
``y2 = depthwise(x1)``, ``n2`` bn2's normalised input, ``x2 = relu6(bn2(y2))``;
``y3 = conv_pro(x2)``; ``residual = bn3(y3) + a``; ``out = adapt_bn(residual) * scale``.
``g<name>`` is the gradient of the loss by ``<name>``, ``z`` a BatchNorm's output before its
ReLU6 (``gz2``: by bn2's output); ``rstd`` a BatchNorm's ``1 / sqrt(var + eps)``, ``s`` its
``weight * rstd`` and ``t`` its shift ``bias - mean * s``.
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch.nn import functional as F

from ..policy import accumulation_dtype
from .stats import (
    channel_moments,
    channel_sums,
    merge_moments,
    moments,
    tile,
)
from .tiling import MapLayout, PieceMaps, Tiling, Workspace, map_chunks, piece_maps


class RefinerWeights(NamedTuple):
    """The refiner's parameters, in the order :class:`RefineWithBatchStats` takes them."""
    conv_exp: torch.Tensor  # (eH, H, 1, 1)
    bn1_weight: torch.Tensor
    bn1_bias: torch.Tensor
    depthwise: torch.Tensor  # (eH, 1, k, k)
    bn2_weight: torch.Tensor
    bn2_bias: torch.Tensor
    conv_pro: torch.Tensor  # (H, eH, 1, 1)
    bn3_weight: torch.Tensor
    bn3_bias: torch.Tensor
    out_weight: torch.Tensor  # adapt_bn's (the ``out_norm`` of ``refine``)
    out_bias: torch.Tensor


class BatchMoments(NamedTuple):
    """The forward's statistics: the heads' mean (H,) and biased covariance (H, H) of the input
    map (accumulation dtype), and each BatchNorm's batch mean and biased variance."""
    head_mean: torch.Tensor
    head_cov: torch.Tensor
    bn1_mean: torch.Tensor
    bn1_var: torch.Tensor
    bn2_mean: torch.Tensor
    bn2_var: torch.Tensor
    bn3_mean: torch.Tensor
    bn3_var: torch.Tensor
    out_mean: torch.Tensor
    out_var: torch.Tensor


class RefineOptions(NamedTuple):
    """What else the Function runs with: the four BatchNorms' eps, the output scale, the
    tiling on the map's device and the pieces of the maps to compute."""
    eps: Tuple[float, float, float, float]
    scale: float
    tiling: Tiling
    layout: MapLayout


class _Plan(NamedTuple):
    """What the forward and the backward share: the float mask, the pieces' maps with their
    row chunks, the row chunks of the whole map, the chunk buffers, the expanded channels,
    the depthwise conv's padding and the entries per channel."""
    keep: Optional[torch.Tensor]
    maps: List[PieceMaps]
    chunks: List[Tuple[int, int]]
    ws: Workspace
    expanded: int
    pad: int
    count: int

    @classmethod
    def build(cls, a: torch.Tensor, mask: Optional[torch.Tensor], weights: RefinerWeights,
              options: RefineOptions) -> '_Plan':
        b, _, n, _ = a.shape
        e = weights.conv_exp.shape[0]
        pad = weights.depthwise.shape[-1] // 2
        keep = None if mask is None else mask.to(a.dtype)
        maps = piece_maps(a, keep, options.layout.pieces, e, (pad, pad), options.tiling)
        chunks = map_chunks(a, e, options.tiling)
        return cls(keep, maps, chunks, options.tiling.workspace(a), e, pad, b * n * n)


class _Saved(NamedTuple):
    """The tensors kept for the backward: the input map, its mask, ``y3`` and the parameters
    and statistics."""
    a: torch.Tensor
    mask: Optional[torch.Tensor]
    y3: torch.Tensor
    weights: RefinerWeights
    moments: BatchMoments

    def flat(self) -> Tuple[Optional[torch.Tensor], ...]:
        return (self.a, self.mask, self.y3, *self.weights, *self.moments)

    @classmethod
    def unflat(cls, tensors: Tuple[Optional[torch.Tensor], ...]) -> '_Saved':
        num_weights = len(RefinerWeights._fields)
        return cls(*tensors[:3], RefinerWeights(*tensors[3:3 + num_weights]),
                   BatchMoments(*tensors[3 + num_weights:]))


def _x1(a: torch.Tensor, center: torch.Tensor, keep: Optional[torch.Tensor],
        w1t: torch.Tensor, r0: int, r1: int, ws: Workspace) -> Tuple[torch.Tensor, torch.Tensor]:
    """relu6(bn1(conv_exp(a))) on query rows [r0, r1) of a (B, H, R, K) map, times the float
    mask ``keep`` (B, 1, R, K): channels-last (B, r1 - r0, K, eH), in buffer ``'h1'``; and
    ``a - center`` on these rows, ``center`` the heads' means (H, 1, 1).

    ``w1t`` (H + 1, eH): conv and BN folded for the centred map, bn1's shift as its last row,
    which meets a row of ones appended to the centred map (the shift added by the matrix
    product, not by a pass over the expanded map). Centred: nearly uniform maps (at
    initialisation) make bn1's scale large, and ``s1 * (W1 a) + t1`` would then cancel in
    float32."""
    b, h, _, n = a.shape
    e = w1t.shape[-1]
    if ws.enabled:
        aug = ws('augmented', b, h + 1, r1 - r0, n)
        torch.sub(a[:, :, r0:r1], center, out=aug[:, :h])
        aug[:, h].fill_(1.)
    else:
        aug = torch.cat([a[:, :, r0:r1] - center, a.new_ones(b, 1, r1 - r0, n)], dim=1)
    x = torch.bmm(aug.view(b, h + 1, -1).transpose(1, 2), w1t.expand(b, -1, -1),
                  out=ws('h1', b, (r1 - r0) * n, e))
    x = x.view(b, r1 - r0, n, e).clamp_(0., 6.)
    if keep is not None:  # a float mask: broadcasting masked_fill_ is slow on the CPU
        x.mul_(keep[:, 0, r0:r1, :, None])
    return x, aug[:, :h]


def _folded_w1(mean_a: torch.Tensor, w1m: torch.Tensor, s1: torch.Tensor,
               b1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The heads' means in the map's dtype (H, 1, 1) and ``conv_exp`` + bn1 folded for the
    centred map (H + 1, eH) (see :func:`_x1`): ``(W1 * s1)^T`` over bn1's shift for the centred
    map, ``b1 - s1 * W1 (mu - center)``."""
    center = mean_a.to(s1.dtype)
    shift = (w1m.to(mean_a.dtype) @ (mean_a - center.to(mean_a.dtype))).to(s1.dtype)
    w1t = torch.cat([(w1m * s1[:, None]).t(), (b1 - s1 * shift)[None]])
    return center.view(-1, 1, 1), w1t


def _head_moments(a: torch.Tensor, chunks: List[Tuple[int, int]], ws: Workspace
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean (H,) and biased covariance (H, H) of the heads of ``a`` over batch, rows and
    columns, accumulated in float64 where the device has it."""
    b, h, n, _ = a.shape
    acc = accumulation_dtype(a.device)
    center = a.mean(dim=(0, 2, 3))
    shift, cov = 0., 0.
    for r0, r1 in chunks:
        d = torch.sub(a[:, :, r0:r1], center.view(h, 1, 1),
                      out=ws('centred', b, h, r1 - r0, n)).view(b, h, -1)
        shift = shift + d.sum(dim=(0, 2)).to(acc)
        cov = cov + torch.bmm(d, d.transpose(1, 2)).sum(0).to(acc)
    count = b * n * n
    shift = shift / count
    return center.to(acc) + shift, cov / count - shift[:, None] * shift[None]


def _hardtanh_backward_(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """ReLU6's backward (zero at the bounds) in place on ``grad``."""
    return torch.ops.aten.hardtanh_backward.grad_input(grad, x, 0., 6., grad_input=grad)


def _in_dtype(stats: Tuple, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """The mean and variance of merged moments in ``dtype``."""
    _, mean, var = stats
    return mean.to(dtype), var.to(dtype)


def _depthwise_forward(a: torch.Tensor, plan: _Plan, far: int, center: torch.Tensor,
                       w1t: torch.Tensor, w2: torch.Tensor
                       ) -> Tuple[List[List[torch.Tensor]], List]:
    """``y2`` on every chunk of every piece, channels-last (B', R, K, eH), and its per-channel
    moments, with those of the zeros outside the pieces."""
    zeros = a.new_zeros(plan.expanded)
    y2, stats = [], [(far, zeros, zeros)] if far else []
    for _, a_p, keep_p, spans in plan.maps:
        y2.append([])
        for r0, r1, i0, i1 in spans:
            x = _x1(a_p, center, keep_p, w1t, i0, i1, plan.ws)[0]
            x = F.conv2d(x.permute(0, 3, 1, 2), w2, padding=plan.pad, groups=plan.expanded)
            x = x[:, :, r0 - i0:r1 - i0].permute(0, 2, 3, 1)  # (B', R, K, eH)
            stats.append(channel_moments(x, plan.ws('sq', *x.shape)))
            y2[-1].append(x)
    return y2, stats


def _project_forward(a: torch.Tensor, plan: _Plan, layout: MapLayout, tiling: Tiling,
                     y2: List[List[torch.Tensor]], s2: torch.Tensor, t2: torch.Tensor,
                     w3m: torch.Tensor) -> Tuple[torch.Tensor, List]:
    """``y3 = conv_pro(relu6(bn2(y2)))`` (B, H, L, L), chunk by chunk (``y2``'s chunks are
    released as they are used), and its per-head moments; outside the pieces
    ``relu6(bn2(0))`` projected."""
    b, h, n, _ = a.shape
    pieces, far = layout
    ws = plan.ws
    y3_far = w3m @ t2.clamp(0., 6.)
    y3 = None
    if len(plan.maps) > 1 or not pieces[0].whole or len(plan.maps[0].chunks) > 1:
        y3 = a.new_empty(b, h, n, n)
        if far:
            y3.copy_(y3_far.view(1, h, 1, 1).expand_as(y3))
    stats = [(far, y3_far, torch.zeros_like(y3_far))] if far else []
    for (piece, a_p, _, spans), y2_p in zip(plan.maps, y2):
        b_p, _, r, k = a_p.shape
        t2_p, s2_p = tile(t2, k), tile(s2, k)
        w3e = w3m.expand(b_p, h, plan.expanded)
        y3_p = y3 if piece.whole else a.new_empty(b_p, h, r, k)
        for i, (r0, r1, _, _) in enumerate(spans):
            x, y2_p[i] = y2_p[i], None
            x = torch.addcmul(t2_p, x, s2_p, out=ws('x2', *x.shape)).clamp_(0., 6.)
            y = torch.bmm(w3e, x.view(b_p, -1, plan.expanded).transpose(1, 2),
                          out=None if y3_p is None else y3_p[:, :, r0:r1].view(b_p, h, -1))
            y = y.view(b_p, h, r1 - r0, k)
            if y3_p is None:  # one whole chunk
                y3 = y3_p = y
            stats.append(moments(y, (0, 2, 3), ws('centred', *y.shape)))
        if not piece.whole:
            piece.scatter_(y3, y3_p, tiling)
    return y3, stats


def _residual_forward(a: torch.Tensor, plan: _Plan, y3: torch.Tensor, s3: torch.Tensor,
                      t3: torch.Tensor) -> Tuple[torch.Tensor, List]:
    """``residual = bn3(y3) + a`` (B, H, L, L), chunk by chunk, and its per-head moments."""
    h = a.shape[1]
    s3v, t3v = s3.view(h, 1, 1), t3.view(h, 1, 1)
    residual = torch.empty_like(y3) if len(plan.chunks) > 1 else None
    stats = []
    for r0, r1 in plan.chunks:
        chunk = torch.addcmul(t3v, y3[:, :, r0:r1], s3v, out=None if residual is None else
                              residual[:, :, r0:r1]).add_(a[:, :, r0:r1])
        residual = chunk if residual is None else residual
        stats.append(moments(chunk, (0, 2, 3), plan.ws('centred', *chunk.shape)))
    return residual, stats


def _bn_backward_coefficients(sum_g: torch.Tensor, sum_gn: torch.Tensor, weight: torch.Tensor,
                              rstd: torch.Tensor, count: int
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A BatchNorm's input gradient is ``(g - mean(g) - normed * mean(g * normed)) * weight *
    rstd``: ``-mean(g * normed)``, ``mean(g)`` and ``weight * rstd``, each (H, 1, 1)."""
    h = weight.shape[0]
    return ((sum_gn / -count).view(h, 1, 1), (sum_g / count).view(h, 1, 1),
            (weight * rstd).view(h, 1, 1))


def _output_backward(grad: torch.Tensor, saved: _Saved, plan: _Plan, rstd: Tuple, scale: float
                     ) -> Tuple[torch.Tensor, torch.Tensor, Tuple[torch.Tensor, ...]]:
    """adapt_bn's and bn3's backward, chunk by chunk on their recomputed normalised inputs:
    ``ga`` (adapt_bn's input gradient, to which the refiner's map gradient is added), ``gy3``
    and the gradients of bn3's and adapt_bn's weight and bias."""
    a, y3, w, m = saved.a, saved.y3, saved.weights, saved.moments
    b, h, n, _ = a.shape
    ws, count = plan.ws, plan.count
    s3 = w.bn3_weight * rstd[2]
    s3v, t3v = s3.view(h, 1, 1), (w.bn3_bias - m.bn3_mean * s3).view(h, 1, 1)
    mean3v, rstd3v, mean4v, rstd4v = (v.view(h, 1, 1) for v in (m.bn3_mean, rstd[2],
                                                                  m.out_mean, rstd[3]))

    def normed4(r0: int, r1: int) -> torch.Tensor:
        """adapt_bn's normalised input on rows [r0, r1), in buffer ``'centred'``."""
        residual = torch.addcmul(t3v, y3[:, :, r0:r1], s3v, out=ws('centred', b, h, r1 - r0, n))
        return residual.add_(a[:, :, r0:r1]).sub_(mean4v).mul_(rstd4v)

    def normed3(r0: int, r1: int) -> torch.Tensor:
        """bn3's normalised input on rows [r0, r1), in buffer ``'centred'``."""
        return torch.sub(y3[:, :, r0:r1], mean3v, out=ws('centred', b, h, r1 - r0, n)
                         ).mul_(rstd3v)

    keep = plan.keep
    gout = (grad.mul(scale) if keep is None else grad * keep.mul(scale)).contiguous()
    sum_g4, sum_gn4 = gout.sum(dim=(0, 2, 3)), 0.
    for r0, r1 in plan.chunks:
        sum_gn4 = sum_gn4 + normed4(r0, r1).mul_(gout[:, :, r0:r1]).sum(dim=(0, 2, 3))
    neg_k4, mean_g4, a4 = _bn_backward_coefficients(sum_g4, sum_gn4, w.out_weight, rstd[3],
                                                    count)
    sum_g3, sum_gn3 = 0., 0.
    for r0, r1 in plan.chunks:  # gout becomes the residual's gradient, in place
        gr = gout[:, :, r0:r1].addcmul_(normed4(r0, r1), neg_k4).sub_(mean_g4).mul_(a4)
        sum_g3 = sum_g3 + gr.sum(dim=(0, 2, 3))
        sum_gn3 = sum_gn3 + normed3(r0, r1).mul_(gr).sum(dim=(0, 2, 3))
    neg_k3, mean_g3, a3 = _bn_backward_coefficients(sum_g3, sum_gn3, w.bn3_weight, rstd[2],
                                                    count)
    ga = gout
    gy3 = torch.empty_like(ga)
    for r0, r1 in plan.chunks:
        torch.addcmul(ga[:, :, r0:r1], normed3(r0, r1), neg_k3,
                      out=gy3[:, :, r0:r1]).sub_(mean_g3).mul_(a3)
    return ga, gy3, (sum_gn3, sum_g3, sum_gn4, sum_g4)


def _project_backward(saved: _Saved, plan: _Plan, far: int, rstd2: torch.Tensor,
                      center: torch.Tensor, w1t: torch.Tensor, gy3: torch.Tensor
                      ) -> Tuple[torch.Tensor, Tuple, List, List]:
    """First pass over the expanded maps, recomputed with the forward's statistics: conv_pro's
    weight gradient and the sums of ``gz2`` and ``gz2 * n2`` that bn2's backward needs over the
    whole map first; ``n2`` and ``gy3`` per piece are kept for the second pass. Outside the
    pieces ``n2`` and ``x2`` are constants: sums of ``gy3`` there suffice."""
    a, w, m = saved.a, saved.weights, saved.moments
    h, e = a.shape[1], plan.expanded
    w3m = w.conv_pro.view(h, e)
    n2_kept, gy3_kept = [], []
    grad_w3 = torch.zeros_like(w3m)
    sum_gz2, sum_gz2n2, sum_gy3 = 0., 0., 0.
    for piece, a_p, keep_p, spans in plan.maps:
        b_p, _, r, k = a_p.shape
        mean2_t, rstd2_t, g2_t, b2_t = (tile(v, k) for v in (m.bn2_mean, rstd2, w.bn2_weight,
                                                             w.bn2_bias))
        w3t = w3m.expand(b_p, h, e)
        gy3_p = piece.gather(gy3)
        n2_p = a.new_empty(b_p, r, k, e) if len(spans) > 1 else None
        for r0, r1, i0, i1 in spans:
            gy = gy3_p[:, :, r0:r1].reshape(b_p, h, -1)
            x1 = _x1(a_p, center, keep_p, w1t, i0, i1, plan.ws)[0]
            y2 = F.conv2d(x1.permute(0, 3, 1, 2), w.depthwise, padding=plan.pad, groups=e)
            y2 = y2[:, :, r0 - i0:r1 - i0].permute(0, 2, 3, 1)
            if n2_p is None:
                n2 = n2_p = y2.sub_(mean2_t).mul_(rstd2_t)
            else:
                n2 = torch.sub(y2, mean2_t, out=n2_p[:, r0:r1]).mul_(rstd2_t)
            x2 = torch.addcmul(b2_t, n2, g2_t, out=plan.ws('x2', *n2.shape)).clamp_(0., 6.)
            grad_w3 += torch.bmm(gy, x2.view(b_p, -1, e)).sum(0)
            gz2 = torch.bmm(gy.transpose(1, 2), w3t, out=plan.ws('gz2', b_p, (r1 - r0) * k, e))
            gz2 = _hardtanh_backward_(gz2.view_as(x2), x2)
            sum_gz2 = sum_gz2 + channel_sums(gz2)
            sum_gz2n2 = sum_gz2n2 + channel_sums(gz2.mul_(n2))
        if far:
            sum_gy3 = sum_gy3 + gy3_p.sum(dim=(0, 2, 3))
        n2_kept.append(n2_p)
        gy3_kept.append(gy3_p)
    if far:
        n2_far = -m.bn2_mean * rstd2
        x2_far = (w.bn2_weight * n2_far + w.bn2_bias).clamp(0., 6.)
        gy3_far = gy3.sum(dim=(0, 2, 3)) - sum_gy3
        grad_w3 += gy3_far[:, None] * x2_far
        gz2_far = (w3m.t() @ gy3_far) * ((x2_far > 0.) & (x2_far < 6.))
        sum_gz2 = sum_gz2 + gz2_far
        sum_gz2n2 = sum_gz2n2 + gz2_far * n2_far
    return grad_w3, (sum_gz2, sum_gz2n2), n2_kept, gy3_kept


def _depthwise_backward(saved: _Saved, plan: _Plan, tiling: Tiling, rstd2: torch.Tensor,
                        center: torch.Tensor, w1t: torch.Tensor, sums_gz2: Tuple, n2_kept: List,
                        gy3_kept: List, ga: torch.Tensor
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second pass: bn2's and the depthwise conv's backward on rows [r0, r1), from ``gz2`` on
    the rows around them, with bn2's ``weight * rstd`` folded into conv_pro's weight; the
    depthwise weight gradient; of bn1's backward ``sum(gz1)``, the product of the centred map
    with ``gz1`` (H, eH) and ``W1^T gz1`` added to ``ga`` (the map gradient, up to an H x H
    correction made by :func:`_expand_backward`). Outside the pieces the expanded maps are zero
    before the depthwise conv: no gradient flows there."""
    a, w = saved.a, saved.weights
    h, e, pad, count = a.shape[1], plan.expanded, plan.pad, plan.count
    sum_gz2, sum_gz2n2 = sums_gz2
    a2 = w.bn2_weight * rstd2
    w2_flipped = w.depthwise.flip(-1, -2)
    grad_w2 = torch.zeros_like(w.depthwise)
    sum_gz1, gz1_a = 0., 0.
    for (piece, a_p, keep_p, spans), n2_p, gy3_p in zip(plan.maps, n2_kept, gy3_kept):
        b_p, _, r, k = a_p.shape
        g2_t, b2_t = tile(w.bn2_weight, k), tile(w.bn2_bias, k)
        neg_mean_gz2, neg_k2 = (tile(v, k) for v in (a2 * sum_gz2 / -count,
                                                      a2 * sum_gz2n2 / -count))
        w3a = (w.conv_pro.view(h, e) * a2).expand(b_p, h, e)
        w1f = w1t[:h].expand(b_p, h, e)
        grad_p = ga if piece.whole else a.new_zeros(b_p, h, r, k)
        for r0, r1, i0, i1 in spans:
            x1, centred = _x1(a_p, center, keep_p, w1t, i0, i1, plan.ws)
            n2 = n2_p[:, i0:i1]
            x2 = torch.addcmul(b2_t, n2, g2_t, out=plan.ws('x2', *n2.shape)).clamp_(0., 6.)
            gy = gy3_p[:, :, i0:i1].reshape(b_p, h, -1)
            gz2 = torch.bmm(gy.transpose(1, 2), w3a, out=plan.ws('gz2', b_p, (i1 - i0) * k, e))
            gy2 = _hardtanh_backward_(gz2.view_as(x2), x2).add_(neg_mean_gz2)
            gy2 = gy2.addcmul_(n2, neg_k2).permute(0, 3, 1, 2)  # (B', eH, F, K)
            gx1 = F.conv2d(gy2, w2_flipped, padding=pad, groups=e)[:, :, r0 - i0:r1 - i0]
            # depthwise weight gradient from the output rows r0:r1 and their input rows
            x1_rows = x1.permute(0, 3, 1, 2)
            if i0 != r0 - pad or i1 != r1 + pad:
                x1_rows = F.pad(x1_rows, (0, 0, pad - (r0 - i0), pad - (i1 - r1)))
            grad_w2 += torch.ops.aten.convolution_backward(
                gy2[:, :, r0 - i0:r1 - i0], x1_rows, w.depthwise, None, [1, 1], [0, pad],
                [1, 1], False, [0, 0], e, [False, True, False])[1]
            gz1 = _hardtanh_backward_(gx1.permute(0, 2, 3, 1), x1[:, r0 - i0:r1 - i0])
            sum_gz1 = sum_gz1 + channel_sums(gz1)
            gz1 = gz1.view(b_p, -1, e)
            centred = centred[:, :, r0 - i0:r1 - i0].reshape(b_p, h, -1)
            gz1_a = gz1_a + torch.bmm(centred, gz1).sum(0)
            grad_p[:, :, r0:r1].view(b_p, h, -1).baddbmm_(w1f, gz1.transpose(1, 2))
        if not piece.whole:
            piece.scatter_(ga, grad_p, tiling, accumulate=True)
    return grad_w2, sum_gz1, gz1_a


def _expand_backward(saved: _Saved, plan: _Plan, rstd1: torch.Tensor, s1: torch.Tensor,
                     center: torch.Tensor, sum_gz1: torch.Tensor, gz1_a: torch.Tensor,
                     ga: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bn1's backward: ``gy1 = s1 (gz1 - mean(gz1)) - s1 rstd1 mean(gz1 n1) (W1 (a - mu))``, n1
    its normalised input ``rstd1 W1 (a - mu)``; its sums follow from ``gz1_a = sum (a - mu)
    gz1^T`` (H, eH). Adds the H x H correction to ``ga``; returns the gradients of conv_exp's
    weight, bn1's weight and bn1's bias (in the accumulation dtype)."""
    a, m = saved.a, saved.moments
    b, h, n, _ = a.shape
    count = plan.count
    acc = m.head_mean.dtype
    w1acc = saved.weights.conv_exp.view(-1, h).to(acc)
    s1acc, rstd1acc = s1.to(acc), rstd1.to(acc)
    gz1_a = gz1_a.t().to(acc)  # (eH, H)
    sum_gz1 = sum_gz1.to(acc)
    sum_gz1n1 = (gz1_a * w1acc).sum(1) * rstd1acc
    k1 = s1acc * rstd1acc * sum_gz1n1 / count
    grad_w1 = s1acc[:, None] * gz1_a - k1[:, None] * count * (w1acc @ m.head_cov)
    # (H, H) applied to the centred map (not to a, then minus mu: the maps are nearly
    # uniform, their mean would cancel in float32)
    correction = (-(w1acc.t() * k1) @ w1acc).to(a.dtype).expand(b, h, h)
    bias = correction[0] @ (m.head_mean.to(a.dtype) - center.view(h))
    bias = (bias - (w1acc.t() @ (s1acc * sum_gz1 / count)).to(a.dtype)).view(h, 1)
    for r0, r1 in plan.chunks:
        centred = torch.sub(a[:, :, r0:r1], center, out=plan.ws('centred', b, h, r1 - r0, n))
        ga[:, :, r0:r1].view(b, h, -1).baddbmm_(correction, centred.view(b, h, -1)).add_(bias)
    return grad_w1, sum_gz1n1, sum_gz1


class RefineWithBatchStats(torch.autograd.Function):
    """``refine`` with all four BatchNorms on batch statistics, in chunks of query rows, so
    that the expanded maps never exist whole in the forward.

    ``conv_exp`` is linear in the map, so bn1's statistics come from the heads' mean and
    covariance (H x H) and its backward reduces to H x H algebra plus two products with the
    gradient of its output; the depthwise conv's output is kept from the statistics pass to the
    projection in the forward, and its normalised values from the first backward pass (the
    sums bn2's backward needs) to the second: one expanded map at a time, only while the
    Function runs. For the backward only the input map and the (B, H, L, L) output of
    ``conv_pro`` are kept. Map-sized (B, H, L, L) steps run chunk by chunk too, on reused
    chunk buffers: besides the output, one fresh map-sized tensor in the forward (``conv_pro``'s
    output) and two in the backward (the map gradient, bn3's input gradient).

    The expanded steps run on the pieces of a :class:`MapLayout`; at the entries outside them
    the expanded maps are constants (conv output 0), entered in the statistics and sums in
    closed form: with padded windows about half of the work.

    Inputs: the map (B, H, L, L), the mask (B, 1, L, L) or None, :class:`RefineOptions`, then
    the :class:`RefinerWeights`. Outputs: the refined map, then each BN's batch mean and
    unbiased variance (for the running statistics).
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, mask: Optional[torch.Tensor], options: RefineOptions,
                *weights: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        w = RefinerWeights(*weights)
        b, h, n, _ = a.shape
        eps, scale, far = options.eps, options.scale, options.layout.far
        plan = _Plan.build(a, mask, w, options)
        e = plan.expanded
        # bn1's statistics: conv_exp(a) = W1 a has mean W1 mu and variance diag(W1 C W1^T)
        w1m = w.conv_exp.view(e, h)
        head_mean, head_cov = _head_moments(a, plan.chunks, plan.ws)
        w1acc = w1m.to(head_mean.dtype)
        mean1 = (w1acc @ head_mean).to(a.dtype)
        var1 = ((w1acc @ head_cov) * w1acc).sum(1).clamp_(min=0.).to(a.dtype)
        s1 = w.bn1_weight * torch.rsqrt(var1 + eps[0])
        center, w1t = _folded_w1(head_mean, w1m, s1, w.bn1_bias)
        y2, stats = _depthwise_forward(a, plan, far, center, w1t, w.depthwise)
        mean2, var2 = _in_dtype(merge_moments(stats), a.dtype)
        s2 = w.bn2_weight * torch.rsqrt(var2 + eps[1])
        t2 = w.bn2_bias - mean2 * s2
        y3, stats = _project_forward(a, plan, options.layout, options.tiling, y2, s2, t2,
                                     w.conv_pro.view(h, e))
        del y2
        mean3, var3 = _in_dtype(merge_moments(stats), a.dtype)
        s3 = w.bn3_weight * torch.rsqrt(var3 + eps[2])
        residual, stats = _residual_forward(a, plan, y3, s3, w.bn3_bias - mean3 * s3)
        mean4, var4 = _in_dtype(merge_moments(stats), a.dtype)
        s4 = w.out_weight * torch.rsqrt(var4 + eps[3])
        out = residual.mul_((s4 * scale).view(h, 1, 1)).add_(
            ((w.out_bias - mean4 * s4) * scale).view(h, 1, 1))
        if mask is not None:
            out.masked_fill_(~mask, 0.)
        batch_moments = BatchMoments(head_mean, head_cov, mean1, var1, mean2, var2, mean3,
                                     var3, mean4, var4)
        ctx.save_for_backward(*_Saved(a, mask, y3, w, batch_moments).flat())
        ctx.options = options
        unbiased = plan.count / max(plan.count - 1, 1)
        stats = [mean1, var1 * unbiased, mean2, var2 * unbiased, mean3, var3 * unbiased,
                 mean4, var4 * unbiased]
        ctx.mark_non_differentiable(*stats)
        return (out, *stats)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, *_) -> Tuple[Optional[torch.Tensor], ...]:
        saved = _Saved.unflat(ctx.saved_tensors)
        options: RefineOptions = ctx.options
        a, w, m = saved.a, saved.weights, saved.moments
        plan = _Plan.build(a, saved.mask, w, options)
        rstd = tuple(torch.rsqrt(v + options.eps[i]) for i, v in
                     enumerate((m.bn1_var, m.bn2_var, m.bn3_var, m.out_var)))
        ga, gy3, norm_grads = _output_backward(grad, saved, plan, rstd, options.scale)
        # the expanded maps recomputed with the forward's statistics
        s1 = w.bn1_weight * rstd[0]
        center, w1t = _folded_w1(m.head_mean, w.conv_exp.view(plan.expanded, -1), s1,
                                 w.bn1_bias)
        grad_w3, sums_gz2, n2_kept, gy3_kept = _project_backward(
            saved, plan, options.layout.far, rstd[1], center, w1t, gy3)
        del gy3
        grad_w2, sum_gz1, gz1_a = _depthwise_backward(
            saved, plan, options.tiling, rstd[1], center, w1t, sums_gz2, n2_kept, gy3_kept, ga)
        del n2_kept, gy3_kept
        grad_w1, grad_g1, grad_b1 = _expand_backward(saved, plan, rstd[0], s1, center, sum_gz1,
                                                     gz1_a, ga)
        grads = RefinerWeights(
            grad_w1.to(a.dtype).view_as(w.conv_exp), grad_g1.to(a.dtype), grad_b1.to(a.dtype),
            grad_w2, sums_gz2[1], sums_gz2[0], grad_w3.view_as(w.conv_pro), *norm_grads)
        return (ga, None, None, *grads)
