"""SleepFM-compatible networks: the base encoder and the staging and diagnosis heads.

Parameter names and shapes follow the public SleepFM release (see
``shared/reference/sleepfm/state_dict_shapes.json``) so released checkpoints load unchanged.
The forward passes are ours: they take a *modality mask* and a *token mask* separately instead of
the release's single padded ``(B, C, S)`` mask, and :func:`reference_masks` converts the release's
layout for equivalence tests.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EMBED_DIM = 128
TOKEN_SAMPLES = 640  # 5 s at 128 Hz
FFN_DIM = 2048  # torch's TransformerEncoderLayer default, which the release uses
POOL_CHUNK = 256  # token sets per modality-pooling pass in the heads (a (1,024 sets x 4, 2048) hidden is 34 MB)
FFN_ROWS = 1024  # tokens per feed-forward pass over a whole night (a (5,760, 2048) hidden is 47 MB)
# Patches per tokenizer pass on CPU: larger passes fall out of cache (on a 2-core AVX-512 machine the
# first convolution took 13.8 ms for 1,920 patches and 1.9 ms for 1,024).
TOKENIZER_CHUNK = 1024


@dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters of the base encoder (``model_base/config.json``)."""

    embed_dim: int = EMBED_DIM
    num_heads: int = 8
    num_layers: int = 6
    pooling_head: int = 8
    dropout: float = 0.3
    patch_size: int = TOKEN_SAMPLES
    max_seq_length: int = 128


@dataclass(frozen=True)
class HeadConfig:
    """Hyper-parameters of a finetuned head (``model_params`` of its ``config.json``)."""

    embed_dim: int = EMBED_DIM
    num_heads: int = 4
    num_layers: int = 1
    num_classes: int = 5
    pooling_head: int = 4
    dropout: float = 0.3
    max_seq_length: int = 8196


def _tokenizer_layers(patch_size: int, embed_dim: int) -> nn.Sequential:
    # Six conv blocks, each halving time and doubling width (1 -> 4 -> ... -> 128), then a global
    # average and a projection. The module indices (0..26) are part of the checkpoint format.
    layers: list[nn.Module] = []
    width_in, length = 1, patch_size
    for width_out in (4, 8, 16, 32, 64, 128):
        length //= 2
        layers += [
            nn.Conv1d(width_in, width_out, kernel_size=5, stride=2, padding=2),
            nn.BatchNorm1d(width_out),
            nn.ELU(),
            nn.LayerNorm([width_out, length]),
        ]
        width_in = width_out
    layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width_in, embed_dim)]
    return nn.Sequential(*layers)


def encoder_layer_forward(
    layer: nn.TransformerEncoderLayer, x: Tensor, key_padding_mask: Tensor | None = None
) -> Tensor:
    """Inference forward of a torch ``TransformerEncoderLayer`` through
    ``scaled_dot_product_attention``.

    Same weights and maths as the layer's own forward, but the fused attention never builds the
    (S x S) score matrix: for a whole night (5,760 tokens, 4 heads) that matrix alone is ~530 MB, and
    the feed-forward block, which treats each token alone, runs ``FFN_ROWS`` tokens at a time with its
    ReLU in place, so its (tokens, 2048) hidden activation is never a whole night's (47 MB, twice).
    ``key_padding_mask`` ``(B, S)`` is True for padding.
    """
    attn = layer.self_attn
    b, s, e = x.shape
    heads = attn.num_heads

    def self_attention(y: Tensor) -> Tensor:
        q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, s, heads, e // heads).transpose(1, 2) for t in (q, k, v))
        mask = None if key_padding_mask is None else ~key_padding_mask.to(torch.bool)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return attn.out_proj(out.transpose(1, 2).reshape(b, s, e))

    def hidden(y: Tensor) -> Tensor:
        h = layer.linear1(y)
        return torch.relu_(h) if layer.activation is F.relu else layer.activation(h)

    def feed_forward(y: Tensor) -> Tensor:
        flat = y.reshape(-1, e)
        if len(flat) <= FFN_ROWS or torch.is_grad_enabled():
            return layer.linear2(hidden(y))
        out = torch.empty_like(flat)
        for i in range(0, len(flat), FFN_ROWS):
            out[i : i + FFN_ROWS] = layer.linear2(hidden(flat[i : i + FFN_ROWS]))
        return out.reshape(y.shape)

    if layer.norm_first:
        x = x + self_attention(layer.norm1(x))
        return x + feed_forward(layer.norm2(x))
    x = layer.norm1(x + self_attention(x))
    return layer.norm2(x + feed_forward(x))


class Tokenizer(nn.Module):
    """Turns each 5-s, single-channel patch into one embedding."""

    def __init__(self, patch_size: int = TOKEN_SAMPLES, embed_dim: int = EMBED_DIM) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.tokenizer = _tokenizer_layers(patch_size, embed_dim)

    def forward(self, patches: Tensor) -> Tensor:
        """``(..., patch_size)`` -> ``(..., embed_dim)``."""
        lead = patches.shape[:-1]
        out = self.tokenizer(patches.reshape(-1, 1, self.patch_size))
        return out.reshape(*lead, self.embed_dim)


class InferenceTokenizer(nn.Module):
    """The tokenizer's inference form: each BatchNorm folded into the convolution before it, ELU
    computed through ``exp``, and at most ``TOKENIZER_CHUNK`` patches a pass on CPU.

    Same function as :class:`Tokenizer` in eval mode (to ~1e-6 in fp32): BatchNorm with frozen
    statistics is an affine map per channel, so it moves into the convolution's weights and bias and
    its pass over the activations disappears. ``exp(min(x, 0)) - 1 + max(x, 0)`` is ELU; torch's own
    ELU calls ``expm1``, which its CPU kernels do not vectorize (it took a third of the tokenizer's
    time on an AVX2 machine), and the ``- 1`` of ELU is left out, since the LayerNorm that follows
    each ELU is unchanged by a constant offset. Built from a tokenizer's current weights: rebuild it
    after loading others.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.patch_size = tokenizer.patch_size
        self.embed_dim = tokenizer.embed_dim
        layers = list(tokenizer.tokenizer)
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        with torch.no_grad():
            for i in range(0, 24, 4):
                conv, bn, _, norm = layers[i : i + 4]
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                folded = nn.Conv1d(conv.in_channels, conv.out_channels, conv.kernel_size[0],
                                   stride=conv.stride[0], padding=conv.padding[0])
                folded.weight.copy_(conv.weight * scale[:, None, None])
                folded.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
                self.convs.append(folded.to(conv.weight.device))
                self.norms.append(norm)
        self.project = layers[26]
        self.eval()

    def forward(self, patches: Tensor) -> Tensor:
        """``(..., patch_size)`` -> ``(..., embed_dim)``; inference only (activations are reused in place)."""
        lead = patches.shape[:-1]
        flat = patches.reshape(-1, 1, self.patch_size)
        if flat.device.type != "cpu" or len(flat) <= TOKENIZER_CHUNK:
            out = self._embed(flat)
        else:
            out = torch.cat([self._embed(flat[i : i + TOKENIZER_CHUNK])
                             for i in range(0, len(flat), TOKENIZER_CHUNK)])
        return out.reshape(*lead, self.embed_dim)

    def _embed(self, x: Tensor) -> Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x)
            # ELU + 1: the LayerNorm after it removes a constant, so the "- 1" pass is skipped (~5 % of the
            # tokenizer; the result moves by float rounding, ~1e-6)
            elu_plus_one = torch.clamp(x, max=0).exp_()
            x = norm(elu_plus_one.add_(x.clamp_(min=0)))
        return self.project(x.mean(dim=-1))


class AttentionPooling(nn.Module):
    """One post-norm transformer layer over a set, then the mean over its valid members."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.transformer_layer = nn.TransformerEncoderLayer(
            d_model=dim, nhead=num_heads, dropout=dropout, batch_first=True
        )

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``x``: ``(B, N, E)``; ``padding_mask``: ``(B, N)``, True where a member is padding."""
        if padding_mask is None:
            return self.transformer_layer(x).mean(dim=1)
        if padding_mask.shape[1] == 1:
            # The release returns a one-member set unchanged, without the transformer layer.
            return x.mean(dim=1)
        out = self.transformer_layer(x, src_key_padding_mask=padding_mask)
        keep = (~padding_mask).to(out.dtype).unsqueeze(-1)
        return (out * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)

    def pool_complete_set(self, x: Tensor) -> Tensor:
        """Pool sets with no padding; a one-member set is returned as is, like the release."""
        if x.shape[1] == 1:
            return x[:, 0]
        return self.transformer_layer(x).mean(dim=1)


class PositionalEncoding(nn.Module):
    """Sinusoidal positions; the table is a saved buffer in the release checkpoints."""

    def __init__(self, max_seq_length: int, dim: int) -> None:
        super().__init__()
        position = torch.arange(max_seq_length, dtype=torch.float32).unsqueeze(1)
        freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        table = torch.zeros(max_seq_length, dim)
        table[:, 0::2] = torch.sin(position * freq)
        table[:, 1::2] = torch.cos(position * freq)
        self.register_buffer("pe", table.unsqueeze(0))

    @property
    def max_length(self) -> int:
        return int(self.pe.shape[1])

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        length = x.shape[1]
        if offset + length > self.max_length:
            raise ValueError(
                f"sequence of {offset + length} tokens exceeds the positional table ({self.max_length})"
            )
        return x + self.pe[:, offset : offset + length]


class SleepEncoder(nn.Module):
    """The base encoder (release name ``SetTransformer``).

    Per channel, a convolutional tokenizer embeds each 5-s patch; attention pooling merges the
    channels of one modality per token; a pre-norm transformer relates the tokens of a window; a
    second attention pooling gives one vector per window.
    """

    def __init__(self, cfg: EncoderConfig = EncoderConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = Tokenizer(cfg.patch_size, cfg.embed_dim)
        self.spatial_pooling = AttentionPooling(cfg.embed_dim, cfg.pooling_head, cfg.dropout)
        self.positional_encoding = PositionalEncoding(cfg.max_seq_length, cfg.embed_dim)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        layer = nn.TransformerEncoderLayer(
            d_model=cfg.embed_dim, nhead=cfg.num_heads, dropout=cfg.dropout,
            batch_first=True, norm_first=True,
        )
        # Nested tensors only pay off with padding, and windows are never padded here.
        self.transformer_encoder = nn.TransformerEncoder(
            layer, num_layers=cfg.num_layers, enable_nested_tensor=False
        )
        self.temporal_pooling = AttentionPooling(cfg.embed_dim, cfg.pooling_head, cfg.dropout)

    def tokenize(self, signals: Tensor) -> Tensor:
        """``(B, C, S * patch)`` -> per-channel token embeddings ``(B, C, S, E)``."""
        b, c, t = signals.shape
        if t % self.cfg.patch_size:
            raise ValueError(f"window of {t} samples is not a whole number of {self.cfg.patch_size}-sample tokens")
        return self.patch_embedding(signals.reshape(b, c, t // self.cfg.patch_size, self.cfg.patch_size))

    def pool_channels(self, tokens: Tensor, channel_mask: Tensor | None = None) -> Tensor:
        """``(B, C, S, E)`` -> ``(B, S, E)``; ``channel_mask`` ``(B, C)`` True for padded channels."""
        b, c, s, e = tokens.shape
        sets = tokens.permute(0, 2, 1, 3).reshape(b * s, c, e)
        mask = None
        if channel_mask is not None:
            mask = channel_mask.to(torch.bool).unsqueeze(1).expand(b, s, c).reshape(b * s, c)
        # At most FFN_ROWS set members a pass at inference: 8 windows of 8 EEG channels are 3,840
        # members, whose (members, 2048) feed-forward activation alone was 31 MB of the process's peak.
        step = max(1, len(sets)) if self.training else max(1, FFN_ROWS // c)
        pooled = []
        for i in range(0, len(sets), step):
            part = sets[i : i + step]
            if mask is None:
                pooled.append(self.spatial_pooling.pool_complete_set(part))
            else:
                pooled.append(self.spatial_pooling(part, mask[i : i + step]))
        return (pooled[0] if len(pooled) == 1 else torch.cat(pooled)).reshape(b, s, e)

    def contextualize(self, seq: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, S, E)`` channel-pooled tokens -> (window vectors ``(B, E)``, token embeddings ``(B, S, E)``)."""
        x = self.layer_norm(self.positional_encoding(seq))
        tokens = self.transformer_encoder(x)
        return self.temporal_pooling(tokens), tokens

    def forward(self, signals: Tensor, channel_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(B, C, S * 640)`` signals -> (window vectors ``(B, E)``, token embeddings ``(B, S, E)``)."""
        return self.contextualize(self.pool_channels(self.tokenize(signals), channel_mask))


class _HeadTrunk(nn.Module):
    """What both finetuned heads share: modality pooling per token."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.spatial_pooling = AttentionPooling(cfg.embed_dim, cfg.pooling_head, cfg.dropout)
        self.positional_encoding = PositionalEncoding(cfg.max_seq_length, cfg.embed_dim)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)

    def pool_modalities(self, tokens: Tensor, modality_mask: Tensor | None) -> Tensor:
        """``(B, M, S, E)`` modality token embeddings -> ``(B, S, E)``.

        ``modality_mask`` ``(B, M)`` is True where a modality is missing for a study. Masked
        members take no part in attention, so for a single study the missing modalities are simply
        left out, which saves their compute and gives the same numbers.
        """
        b, m, s, e = tokens.shape
        if modality_mask is not None and b == 1:
            present = ~modality_mask[0].to(torch.bool)
            tokens, modality_mask = tokens[:, present], None
            m = tokens.shape[1]
        sets = tokens.permute(0, 2, 1, 3).reshape(b * s, m, e)
        mask = None
        if modality_mask is not None:
            mask = modality_mask.to(torch.bool).unsqueeze(1).expand(b, s, m).reshape(b * s, m)
        # In chunks: a whole night at once would need a (tokens x modalities, 2048) feed-forward
        # activation of ~750 MB; per chunk it stays in cache and memory stays flat.
        pooled = []
        for start in range(0, b * s, POOL_CHUNK):
            part = sets[start : start + POOL_CHUNK]
            if mask is None:
                # Unlike the encoder's channel pooling, the release always runs the transformer here.
                pooled.append(self.spatial_pooling.transformer_layer(part).mean(dim=1))
            else:
                pooled.append(self.spatial_pooling(part, mask[start : start + POOL_CHUNK]))
        return torch.cat(pooled).reshape(b, s, e)


class StagingHead(_HeadTrunk):
    """Sleep staging per 5-s token (release name ``SleepEventLSTMClassifier``); classes W, N1, N2, N3, REM."""

    def __init__(self, cfg: HeadConfig = HeadConfig()) -> None:
        super().__init__(cfg)
        layer = nn.TransformerEncoderLayer(
            d_model=cfg.embed_dim, nhead=cfg.num_heads, dropout=cfg.dropout,
            batch_first=True, norm_first=True,
        )
        self.transformer_encoder = nn.TransformerEncoder(
            layer, num_layers=cfg.num_layers, enable_nested_tensor=False
        )
        self.lstm = nn.LSTM(
            input_size=cfg.embed_dim, hidden_size=cfg.embed_dim // 2, num_layers=cfg.num_layers,
            batch_first=True, dropout=cfg.dropout if cfg.num_layers > 1 else 0.0, bidirectional=True,
        )
        self.fc = nn.Linear(cfg.embed_dim, cfg.num_classes)

    def forward(
        self, tokens: Tensor, modality_mask: Tensor | None = None, token_mask: Tensor | None = None
    ) -> Tensor:
        """``(B, M, S, E)`` -> logits ``(B, S, classes)``; ``token_mask`` ``(B, S)`` True for padding."""
        x = self.layer_norm(self.positional_encoding(self.pool_modalities(tokens, modality_mask)))
        if token_mask is not None and not bool(token_mask.any()):
            token_mask = None
        if self.training:
            x = self.transformer_encoder(x, src_key_padding_mask=token_mask)
        else:
            for layer in self.transformer_encoder.layers:
                x = encoder_layer_forward(layer, x, token_mask)
        x, _ = _lstm_fp32(self.lstm, x)
        return self.fc(x)


def _lstm_fp32(lstm: nn.LSTM, x: Tensor | nn.utils.rnn.PackedSequence) -> tuple:
    """The heads' LSTM outside autocast, in fp32: oneDNN has no bf16 LSTM on CPUs without native bf16
    (AVX2-only machines fail with "could not create a primitive descriptor"), and the heads are cheap.

    At inference on CPU it runs on one thread (:func:`one_cpu_thread`)."""
    device = (x.data if isinstance(x, nn.utils.rnn.PackedSequence) else x).device.type
    single = one_cpu_thread() if device == "cpu" and not lstm.training else contextlib.nullcontext()
    with torch.autocast(device_type=device, enabled=False), single:
        if not isinstance(x, nn.utils.rnn.PackedSequence):
            x = x.float()
        return lstm(x)


@contextlib.contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Torch's CPU ops on one thread inside the block, then the thread count as it was.

    For the heads' LSTM: each of its steps (one per 5-s token, 5,760 a night, per direction and layer)
    is a matmul too small to share, so a second thread only adds a hand-over per step, and where
    OpenMP threads sleep while they wait (``OMP_WAIT_POLICY=PASSIVE``, the command line's default
    until 2026-12-07) every hand-over wakes a sleeping thread: on 2 cores one night's 2-layer LSTM
    took 1.55 s on two threads and 0.039 s on one (0.054-0.073 s on two with spinning threads).
    Setting the count back costs ~1 ms. Torch's setting also sets MKL's, which is process-wide, so an
    engine running beside this one in another thread may run a matmul single-threaded meanwhile:
    slower, never different.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class DiagnosisHead(_HeadTrunk):
    """Cox proportional-hazards risk per outcome from a whole night plus age and sex
    (release name ``DiagnosisFinetuneFullLSTMCOXPHWithDemo``).

    The release defines a positional table and a layer norm it never uses in its forward pass;
    they are kept so its checkpoints load.
    """

    def __init__(self, cfg: HeadConfig = HeadConfig(num_layers=2, num_classes=1065, pooling_head=8,
                                                  num_heads=8, max_seq_length=6480)) -> None:
        super().__init__(cfg)
        self.lstm = nn.LSTM(
            input_size=cfg.embed_dim, hidden_size=cfg.embed_dim // 2, num_layers=cfg.num_layers,
            batch_first=True, bidirectional=True,
        )
        self.demo_embedding = nn.Sequential(
            nn.Linear(2, cfg.embed_dim // 4), nn.ReLU(), nn.Dropout(cfg.dropout)
        )
        self.disease_heads = nn.Linear(cfg.embed_dim + cfg.embed_dim // 4, cfg.num_classes)

    def forward(
        self,
        tokens: Tensor,
        demographics: Tensor,
        modality_mask: Tensor | None = None,
        token_mask: Tensor | None = None,
    ) -> Tensor:
        """``(B, M, S, E)`` tokens and ``(B, 2)`` encoded (age, sex) -> log-hazards ``(B, classes)``."""
        x = self.pool_modalities(tokens, modality_mask)
        if token_mask is None or not bool(token_mask.any()):
            out, _ = _lstm_fp32(self.lstm, x)
            night = out.mean(dim=1)
        else:
            lengths = (~token_mask.to(torch.bool)).sum(dim=1)
            packed = nn.utils.rnn.pack_padded_sequence(
                x.float(), lengths.cpu(), batch_first=True, enforce_sorted=False
            )
            out, _ = _lstm_fp32(self.lstm, packed)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
            valid = (~token_mask.to(torch.bool)).to(out.dtype).unsqueeze(-1)
            night = (out * valid).sum(dim=1) / lengths.clamp(min=1).to(out.dtype).unsqueeze(-1)
        demo = self.demo_embedding(demographics.to(night.dtype))
        return self.disease_heads(torch.cat([night, demo], dim=1))


def reference_masks(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Split the release's ``(B, M, S)`` head mask into (modality ``(B, M)``, token ``(B, S)``) masks.

    The release reads the modality mask at token 0 and the token mask from modality 0.
    """
    mask = mask.to(torch.bool)
    return mask[:, :, 0], mask[:, 0, :]
