"""Swin's window attention, shared by BOAT-Swin and MAFormer, and the attention kernel as a
module."""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn


class ScaledDotProductAttention(nn.Module):
    """``F.scaled_dot_product_attention`` as a module without parameters or state.

    The fused kernels never materialise the attention weights; forward hooks on this module see
    everything they are made of (queries, keys, the additive or boolean ``attn_mask`` and the
    ``scale``), which is how ``mmvit_plugins.visualization`` reads them. Call it with the tensors
    positionally and the options by keyword, as the backbones do.
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.,
                scale: Optional[float] = None) -> torch.Tensor:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                              dropout_p=dropout_p, scale=scale)


class WindowMSA(nn.Module):
    """Swin's window multi-head self-attention with a relative position bias.

    Input (B*nW, Wh*Ww, C) tokens of windows, optional additive mask (nW, Wh*Ww, Wh*Ww)
    (:func:`~mmvit_plugins.models.layers.window.window_attention_mask`). Keys as in the public
    Swin: ``qkv``, ``proj``, ``relative_position_bias_table``, buffer
    ``relative_position_index``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: Union[int, Tuple[int, int]],
                 qkv_bias: bool = True, attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        wh, ww = (window_size, window_size) if isinstance(window_size, int) else window_size
        self.window_size = (wh, ww)
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing='ij'))
        coords = coords.flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
        index = (rel[..., 0] + wh - 1) * (2 * ww - 1) + rel[..., 1] + ww - 1
        self.register_buffer('relative_position_index', index, persistent=True)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.sdpa = ScaledDotProductAttention()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def relative_position_bias(self) -> torch.Tensor:
        """(num_heads, Wh*Ww, Wh*Ww)."""
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        # contiguous: SDPA's fused CPU kernel refuses a mask whose last dim is strided
        return bias.view(n, n, -1).permute(2, 0, 1).contiguous()

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias().unsqueeze(0)
        if mask is not None:
            num_windows = mask.shape[0]
            bias = (bias.unsqueeze(0) + mask[None, :, None]).expand(
                b // num_windows, -1, -1, -1, -1).reshape(b, self.num_heads, n, n)
        out = self.sdpa(
            q, k, v, attn_mask=bias.to(q.dtype),
            dropout_p=self.attn_drop if self.training else 0., scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))
