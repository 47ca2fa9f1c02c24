"""The memory-driven report decoder (R2Gen design): a transformer encoder over the visual
tokens and a decoder whose layer norms are conditioned on a relational memory (MCLN).

Shapes use ``B`` batch, ``L`` visual tokens, ``D`` visual dim, ``d`` decoder width, ``T``
tokens, ``V`` vocabulary, ``M`` memory slots and ``N`` decoder layers. Training runs
:meth:`ReportDecoder.forward` (teacher forcing); decoding runs :meth:`ReportDecoder.prepare`
once per image and then :meth:`ReportDecoder.step` once per token, with the state explicit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.errors import ModelError
from model.tokenizer import PAD_ID, SEP_ID


class Attention(nn.Module):
    """Multi-head scaled dot-product attention; ``mask`` True = may attend."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dk = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.drop = nn.Dropout(dropout)

    def forward(self, query: Tensor, kv: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.attend(query, self.k(kv), self.v(kv), mask)

    def attend(
        self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        """:meth:`forward` with the key and value projections ``(B,Tk,d)`` already applied
        (a decoder's cache holds them)."""
        b, tq, _ = query.shape
        tk = keys.shape[1]
        q = self.q(query).view(b, tq, self.heads, self.dk).transpose(1, 2)  # (B,h,Tq,dk)
        k = keys.view(b, tk, self.heads, self.dk).transpose(1, 2)
        v = values.view(b, tk, self.heads, self.dk).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.dk)  # (B,h,Tq,Tk)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        attn = self.drop(torch.softmax(scores, dim=-1))
        out: Tensor = self.o((attn @ v).transpose(1, 2).reshape(b, tq, -1))
        return out


class FeedForward(nn.Sequential):
    def __init__(self, d: int, d_ff: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(d, d_ff), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(d_ff, d)
        )


class RelationalMemory(nn.Module):
    """R2Gen-style relational memory: ``M`` slots updated once per input token.

    ``M' = gate_i * tanh(MLP(M + Attn(M, [M; y]))) + gate_f * M`` with input and
    forget gates computed from the token ``y`` and ``tanh(M)``.
    """

    def __init__(self, d: int, slots: int, heads: int) -> None:
        super().__init__()
        self.d, self.slots = d, slots
        self.attn = Attention(d, heads, 0.0)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, d))
        self.w_gate = nn.Linear(d, 2 * d)
        self.u_gate = nn.Linear(d, 2 * d)

    def initial(self, batch: int, device: torch.device | str = "cpu") -> Tensor:
        """Identity-like initial memory ``(B,M,d)``."""
        return torch.eye(self.slots, self.d, device=device).expand(batch, -1, -1).contiguous()

    def forward(self, memory: Tensor, y: Tensor) -> Tensor:
        """One update: memory ``(B,M,d)``, token embedding ``(B,d)`` -> ``(B,M,d)``."""
        kv = torch.cat([memory, y[:, None, :]], dim=1)  # (B,M+1,d)
        nxt = memory + self.attn(memory, kv)
        nxt = nxt + self.mlp(nxt)
        gates = self.w_gate(y)[:, None, :] + self.u_gate(torch.tanh(memory))  # (B,M,2d)
        i, f = gates.chunk(2, dim=-1)
        return torch.sigmoid(i) * torch.tanh(nxt) + torch.sigmoid(f) * memory


class MCLN(nn.Module):
    """Memory-driven conditional layer norm: gamma/beta shifted by an MLP of the memory."""

    def __init__(self, d: int, memory_dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(d))
        self.beta = nn.Parameter(torch.zeros(d))
        self.d_gamma = nn.Sequential(
            nn.Linear(memory_dim, d), nn.ReLU(inplace=True), nn.Linear(d, d)
        )
        self.d_beta = nn.Sequential(
            nn.Linear(memory_dim, d), nn.ReLU(inplace=True), nn.Linear(d, d)
        )
        for mlp in (self.d_gamma, self.d_beta):
            last = mlp[2]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:  # x (B,T,d), memory (B,T,M*d)
        x = F.layer_norm(x, x.shape[-1:], eps=1e-6)
        out: Tensor = x * (self.gamma + self.d_gamma(memory)) + self.beta + self.d_beta(memory)
        return out


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer over visual tokens (no positions)."""

    def __init__(self, d: int, heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, heads, dropout)
        self.ff = FeedForward(d, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # x (B,L,d), mask (B,1,1,L)
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, h, mask))
        out: Tensor = x + self.drop(self.ff(self.ln2(x)))
        return out


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer whose three norms are MCLN."""

    def __init__(self, d: int, heads: int, d_ff: int, dropout: float, memory_dim: int) -> None:
        super().__init__()
        self.n1, self.n2, self.n3 = (MCLN(d, memory_dim) for _ in range(3))
        self.self_attn = Attention(d, heads, dropout)
        self.cross_attn = Attention(d, heads, dropout)
        self.ff = FeedForward(d, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, memory: Tensor, causal: Tensor, enc: Tensor, enc_mask: Tensor
    ) -> Tensor:
        h = self.n1(x, memory)
        x = x + self.drop(self.self_attn(h, h, causal))
        x = x + self.drop(self.cross_attn(self.n2(x, memory), enc, enc_mask))
        out: Tensor = x + self.drop(self.ff(self.n3(x, memory)))
        return out

    def step(
        self,
        x: Tensor,
        memory: Tensor,
        past_keys: Tensor,
        past_values: Tensor,
        cross_keys: Tensor,
        cross_values: Tensor,
        enc_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward` of one new position ``(B,1,d)`` given the self-attention keys and
        values of the earlier ones ``(B,P,d)`` and the cross-attention keys and values of the
        encoder states ``(B,L,d)``; returns its output and its own key and value.

        Earlier positions never attend to later ones, so their keys and values do not change
        once computed: each step projects only the new position.
        """
        h = self.n1(x, memory)
        key, value = self.self_attn.k(h), self.self_attn.v(h)  # (B,1,d)
        keys = torch.cat([past_keys, key], dim=1)
        values = torch.cat([past_values, value], dim=1)
        x = x + self.drop(self.self_attn.attend(h, keys, values))
        x = x + self.drop(
            self.cross_attn.attend(self.n2(x, memory), cross_keys, cross_values, enc_mask)
        )
        out: Tensor = x + self.drop(self.ff(self.n3(x, memory)))
        return out, key, value


def sinusoid_positions(length: int, d: int) -> Tensor:
    """Standard sinusoidal position table ``(length, d)``."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(length, d)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : d // 2]
    return table


class ReportDecoder(nn.Module):
    """Memory-driven transformer (R2Gen design): visual encoder + MCLN decoder."""

    positions: Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= SEP_ID:
            raise ModelError(f"vocab_size: must exceed the special tokens, got {cfg.vocab_size}")
        d = cfg.d_model
        self.d, self.slots = d, cfg.memory_slots
        self.visual_proj = nn.Sequential(
            nn.Linear(cfg.visual_dim, d), nn.ReLU(inplace=True), nn.Dropout(cfg.visual_dropout)
        )
        self.encoder = nn.ModuleList(
            EncoderLayer(d, cfg.num_heads, cfg.d_ff, cfg.dropout)
            for _ in range(cfg.num_encoder_layers)
        )
        self.encoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.embed = nn.Embedding(cfg.vocab_size, d, padding_idx=PAD_ID)
        self.register_buffer(
            "positions", sinusoid_positions(cfg.max_tokens + 1, d), persistent=False
        )
        self.embed_drop = nn.Dropout(cfg.dropout)
        self.context = nn.Linear(d, d)
        self.memory = RelationalMemory(d, cfg.memory_slots, cfg.num_heads)
        mem_dim = d * cfg.memory_slots
        self.layers = nn.ModuleList(
            DecoderLayer(d, cfg.num_heads, cfg.d_ff, cfg.dropout, mem_dim)
            for _ in range(cfg.num_decoder_layers)
        )
        self.final_norm = MCLN(d, mem_dim)
        self.out = nn.Linear(d, cfg.vocab_size)

    def encode(self, visual: Tensor, mask: Tensor) -> Tensor:
        """Visual tokens ``(B,L,D)`` + mask ``(B,L)`` -> encoder states ``(B,L,d)``."""
        x = self.visual_proj(visual)
        m = mask[:, None, None, :]
        for layer in self.encoder:
            x = layer(x, m)
        out: Tensor = self.encoder_norm(x)
        return out

    def visual_context(self, enc: Tensor, enc_mask: Tensor) -> Tensor:
        """Encoder states ``(B,L,d)`` -> one context vector per image ``(B,1,d)``.

        A masked max over the visual tokens (what is present anywhere: a region token with a
        confident class dominates its features) through a linear map. It is added to every
        token embedding, so the image reaches the relational memory and every MCLN directly,
        not only through cross-attention.
        """
        pooled = enc.masked_fill(~enc_mask[..., None], torch.finfo(enc.dtype).min).amax(dim=1)
        out: Tensor = self.context(pooled)[:, None, :]
        return out

    def embed_tokens(self, tokens: Tensor, context: Tensor, start: int = 0) -> Tensor:
        """Token ids ``(B,T)`` at positions ``start``.. -> scaled embeddings + positions +
        visual context ``(B,T,d)``."""
        t = tokens.shape[1]
        emb = self.embed(tokens) * math.sqrt(self.d) + self.positions[start : start + t] + context
        out: Tensor = self.embed_drop(emb)
        return out

    def _decode(self, emb: Tensor, memory: Tensor, enc: Tensor, enc_mask: Tensor) -> Tensor:
        t = emb.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=emb.device).tril()[None, None]
        m = enc_mask[:, None, None, :]
        x = emb
        for layer in self.layers:
            x = layer(x, memory, causal, enc, m)
        return torch.log_softmax(self.out(self.final_norm(x, memory)), dim=-1)  # (B,T,V)

    def forward(self, enc: Tensor, enc_mask: Tensor, tokens: Tensor) -> Tensor:
        """Teacher forcing: input ids ``(B,T)`` -> next-token log-probs ``(B,T,V)``."""
        emb = self.embed_tokens(tokens, self.visual_context(enc, enc_mask))
        mem = self.memory.initial(tokens.shape[0], tokens.device)
        states = []
        for i in range(tokens.shape[1]):  # relational memory is sequential by design
            mem = self.memory(mem, emb[:, i])
            states.append(mem.flatten(1))
        return self._decode(emb, torch.stack(states, dim=1), enc, enc_mask)

    def prepare(self, enc: Tensor, enc_mask: Tensor) -> tuple[Tensor, Tensor]:
        """What every decoding step reads of the image, computed once per image: the visual
        context ``(B,1,d)`` and the cross-attention keys and values of the encoder states in
        each decoder layer ``(B,2N,L,d)`` (layer ``i``: keys at ``2i``, values at ``2i+1``)."""
        projections = []
        for layer in self.layers:
            assert isinstance(layer, DecoderLayer)
            projections += [layer.cross_attn.k(enc), layer.cross_attn.v(enc)]
        return self.visual_context(enc, enc_mask), torch.stack(projections, dim=1)

    def initial_state(
        self, batch: int, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, Tensor]:
        """Decoder state before the first token: the initial relational memory ``(B,M,d)``
        and an empty cache ``(B,2N,0,d)`` (see :meth:`step`)."""
        cache = torch.zeros(batch, 2 * len(self.layers), 0, self.d, device=device)
        return self.memory.initial(batch, device), cache

    def step(
        self,
        tokens: Tensor,
        memory: Tensor,
        cache: Tensor,
        context: Tensor,
        cross: Tensor,
        enc_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One decoding step with the decoder state explicit (exportable).

        Parameters
        ----------
        tokens : Tensor
            ``(B,1)``: the newest id (BOS at the first step).
        memory : Tensor
            ``(B,M,d)``: the relational memory before consuming it.
        cache : Tensor
            ``(B,2N,P,d)``: the self-attention keys and values of the ``P`` earlier positions
            in each of the ``N`` decoder layers (layer ``i``: keys at ``2i``, values at
            ``2i+1``); ``P`` = 0 at the first step (:meth:`initial_state`).
        context, cross, enc_mask : Tensor
            The image, from :meth:`prepare`, and the encoder mask ``(B,L)``.

        Returns
        -------
        tuple of Tensor
            Log-probs of the next token ``(B,V)``, the memory after the token ``(B,M,d)``
            and the new position's keys and values ``(B,2N,1,d)`` (append them to
            ``cache`` along dimension 2 for the next step).
        """
        emb = self.embed_tokens(tokens, context, start=cache.shape[2])  # (B,1,d)
        new = self.memory(memory, emb[:, 0])  # (B,M,d)
        after = new.flatten(1)[:, None]  # (B,1,M*d): MCLN conditions on the memory after it
        m = enc_mask[:, None, None, :]
        x = emb
        entries = []
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, DecoderLayer)
            x, key, value = layer.step(
                x,
                after,
                cache[:, 2 * i],
                cache[:, 2 * i + 1],
                cross[:, 2 * i],
                cross[:, 2 * i + 1],
                m,
            )
            entries += [key, value]
        logits = self.out(self.final_norm(x, after))[:, 0]  # (B,V)
        return torch.log_softmax(logits, dim=-1), new, torch.stack(entries, dim=1)


__all__ = [
    "MCLN",
    "Attention",
    "DecoderLayer",
    "EncoderLayer",
    "FeedForward",
    "RelationalMemory",
    "ReportDecoder",
    "sinusoid_positions",
]
