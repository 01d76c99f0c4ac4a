"""GNMT-style LSTM encoder-decoder with attention (Wu et al. 2016, arXiv 1609.08144), as tensorflow/nmt's
``gnmt_v2`` architecture builds it (its ``wmt16_gnmt_4_layer`` recipe is LEGW's GNMT baseline).

Encoder: layer 1 bidirectional (each direction ``hidden`` wide, outputs concatenated), then
unidirectional layers; residual connections from layer ``residual_from`` on (the paper: the third).
Decoder: the bottom layer reads [target embedding; previous context] and its output is the attention
query; every upper layer reads [layer below; this step's context] (tensorflow/nmt ``gnmt_v2``, "new
attention"), residual from ``residual_from`` on, adding the layer's input without the context. The
decoder's layers start from the encoder's final states (``pass_hidden_state``; the bidirectional layer
hands over its backward direction, as tensorflow/nmt). Dropout on every layer's input; weights
uniform(-init_range, init_range); the LSTM forget-gate bias starts at 1 (tensorflow/nmt ``forget_bias``).

Attention scores (``attention``): ``bahdanau`` (additive), ``normed_bahdanau`` (additive with a
weight-normalised v and a bias, GNMT's), ``luong`` (multiplicative), ``scaled_luong`` (with a learned
scale). The context is the attention-weighted sum of the encoder's top outputs.

The loss is SUMMED over target tokens (label smoothing in training only); the task divides it by the
step's global count of sentences or tokens. Decoding: batched greedy and beam search with GNMT's length
penalty ((5 + |Y|) / 6) ** alpha, |Y| counting the end token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from largebatch.labels import BOS_ID as BOS
from largebatch.labels import EOS_ID as EOS
from largebatch.labels import IGNORE_INDEX
from largebatch.labels import PAD_ID as PAD

ATTENTIONS = ("normed_bahdanau", "bahdanau", "luong", "scaled_luong")


@dataclass(frozen=True)
class Seq2seqShape:
    vocab_size: int
    hidden: int
    embed: int
    encoder_layers: int
    decoder_layers: int
    attention: str = "normed_bahdanau"
    residual_from: int = 3  # 1-based: layers from this one on add their input to their output
    dropout: float = 0.2
    init_range: float = 0.1
    tie_embeddings: bool = False  # the decoder's input embedding is its output projection's weight
    pass_hidden_state: bool = True
    label_smoothing: float = 0.0


class Attention(nn.Module):
    def __init__(self, kind: str, query_size: int, memory_size: int, units: int):
        super().__init__()
        if kind not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {kind!r}")
        self.kind = kind
        self.memory_layer = nn.Linear(memory_size, units if kind.endswith("bahdanau") else query_size, bias=False)
        if kind.endswith("bahdanau"):
            self.query_layer = nn.Linear(query_size, units, bias=False)
            self.v = nn.Parameter(torch.empty(units))
            if kind == "normed_bahdanau":  # weight normalisation of v (Salimans & Kingma 2016), as GNMT
                self.g = nn.Parameter(torch.tensor(math.sqrt(1.0 / units)))
                self.b = nn.Parameter(torch.zeros(units))
        elif kind == "scaled_luong":
            self.g = nn.Parameter(torch.tensor(1.0))

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        """The memory's projection, computed once per source batch."""
        return self.memory_layer(memory)

    def forward(self, query, keys, memory, mask) -> torch.Tensor:
        """query [B, Q], keys [B, S, K], memory [B, S, M], mask [B, S] (True at real tokens) -> context [B, M]."""
        if self.kind.endswith("bahdanau"):
            hidden = keys + self.query_layer(query).unsqueeze(1)
            v = self.v
            if self.kind == "normed_bahdanau":
                hidden = hidden + self.b
                v = self.g * v / v.norm()
            scores = torch.tanh(hidden) @ v
        else:
            scores = torch.bmm(keys, query.unsqueeze(2)).squeeze(2)
            if self.kind == "scaled_luong":
                scores = self.g * scores
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
        return torch.bmm(weights.unsqueeze(1), memory).squeeze(1)


class GNMT(nn.Module):
    def __init__(self, shape: Seq2seqShape):
        super().__init__()
        s = self.shape = shape
        h = s.hidden
        self.src_embed = nn.Embedding(s.vocab_size, s.embed, padding_idx=PAD)
        self.tgt_embed = nn.Embedding(s.vocab_size, s.embed, padding_idx=PAD)
        self.encoder = nn.ModuleList([nn.LSTM(s.embed, h, batch_first=True, bidirectional=True)])
        for i in range(1, s.encoder_layers):
            self.encoder.append(nn.LSTM(2 * h if i == 1 else h, h, batch_first=True))
        memory_size = 2 * h if s.encoder_layers == 1 else h
        self.attention = Attention(s.attention, h, memory_size, h)
        self.decoder = nn.ModuleList([nn.LSTMCell(s.embed + memory_size, h)])
        for _ in range(1, s.decoder_layers):
            self.decoder.append(nn.LSTMCell(h + memory_size, h))
        self.drop = nn.Dropout(s.dropout)
        self.project = nn.Linear(h, s.vocab_size, bias=False)
        self._init_weights()
        if s.tie_embeddings:
            if s.embed != h:
                raise ValueError(f"tie_embeddings needs embed == hidden (got {s.embed} and {h})")
            self.project.weight = self.tgt_embed.weight
        if s.pass_hidden_state and (s.encoder_layers != s.decoder_layers):
            raise ValueError("pass_hidden_state needs as many encoder as decoder layers "
                             f"(got {s.encoder_layers} and {s.decoder_layers}); set it to false")

    def _init_weights(self) -> None:
        r = self.shape.init_range
        for name, p in self.named_parameters():
            if name.startswith("attention.") and name.split(".")[-1] in ("g", "b"):
                continue
            nn.init.uniform_(p, -r, r)
            if "bias_ih" in name:  # LSTM gate order i, f, g, o: forget bias 1 (torch adds bias_ih + bias_hh)
                hidden = p.shape[0] // 4
                with torch.no_grad():
                    p[hidden:2 * hidden] += 1.0
        for emb in (self.src_embed, self.tgt_embed):
            with torch.no_grad():
                emb.weight[PAD].zero_()

    def _residual(self, layer: int) -> bool:
        """Whether 0-based ``layer`` adds its input to its output."""
        return layer + 1 >= self.shape.residual_from

    # ------------------------------------------------------------------ encoder
    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor):
        """-> (memory [B, S, M], keys, mask [B, S], the decoder's initial states)."""
        lengths = src_lengths.cpu()
        x = self.src_embed(src)
        finals = []
        for i, lstm in enumerate(self.encoder):
            packed = pack_padded_sequence(self.drop(x), lengths, batch_first=True, enforce_sorted=False)
            out, (h_n, c_n) = lstm(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
            finals.append((h_n[-1], c_n[-1]))  # the bidirectional layer: its backward direction
            x = out + x if i >= 2 and self._residual(i) else out  # layer 2 narrows 2h -> h: never residual
        mask = torch.arange(src.shape[1], device=src.device).unsqueeze(0) < src_lengths.unsqueeze(1)
        states = finals if self.shape.pass_hidden_state else [None] * len(self.decoder)
        return x, self.attention.keys(x), mask, states

    # ------------------------------------------------------------------ decoder
    def _zero_states(self, states, batch: int, like: torch.Tensor):
        zeros = like.new_zeros(batch, self.shape.hidden)
        return [(zeros, zeros) if s is None else s for s in states]

    def step(self, token_embed, context, states, memory, keys, mask):
        """One decoder step: -> (top output [B, H], new context, new states)."""
        h, c = self.decoder[0](torch.cat([self.drop(token_embed), context], dim=1), states[0])
        new_states = [(h, c)]
        context = self.attention(h, keys, memory, mask)
        x = h
        for i in range(1, len(self.decoder)):
            h, c = self.decoder[i](torch.cat([self.drop(x), context], dim=1), states[i])
            new_states.append((h, c))
            x = h + x if self._residual(i) else h
        return x, context, new_states

    def forward(self, src, src_lengths, tgt_in, tgt_out) -> dict:
        """Teacher forcing. src [B, S] (PAD-padded), tgt_in [B, T] (BOS + target), tgt_out [B, T]
        (target + EOS, IGNORE_INDEX-padded) -> {"loss_sum", "count" (target tokens)}."""
        memory, keys, mask, states = self.encode(src, src_lengths)
        states = self._zero_states(states, src.shape[0], memory)
        context = memory.new_zeros(src.shape[0], memory.shape[-1])
        embedded = self.tgt_embed(tgt_in)
        outputs = []
        for t in range(tgt_in.shape[1]):
            x, context, states = self.step(embedded[:, t], context, states, memory, keys, mask)
            outputs.append(x)
        logits = self.project(self.drop(torch.stack(outputs, dim=1))).float()
        targets = tgt_out.reshape(-1)
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX,
                                   reduction="sum", label_smoothing=self.shape.label_smoothing if self.training else 0.0)
        return {"loss_sum": loss_sum, "count": int((targets != IGNORE_INDEX).sum())}

    # ------------------------------------------------------------------ decoding
    def _log_probs(self, tokens, context, states, memory, keys, mask):
        x, context, states = self.step(self.tgt_embed(tokens), context, states, memory, keys, mask)
        return torch.log_softmax(self.project(x).float(), dim=-1), context, states

    @torch.no_grad()
    def greedy(self, src, src_lengths, max_len: int) -> list[list[int]]:
        """The arg-max token at each step until EOS (or ``max_len`` tokens); token ids without BOS/EOS."""
        memory, keys, mask, states = self.encode(src, src_lengths)
        batch = src.shape[0]
        states = self._zero_states(states, batch, memory)
        context = memory.new_zeros(batch, memory.shape[-1])
        tokens = torch.full((batch,), BOS, dtype=torch.long, device=src.device)
        done = torch.zeros(batch, dtype=torch.bool, device=src.device)
        out = []
        for _ in range(max_len):
            log_probs, context, states = self._log_probs(tokens, context, states, memory, keys, mask)
            tokens = log_probs.argmax(-1)
            out.append(tokens)
            done |= tokens == EOS
            if bool(done.all()):
                break
        return [_until_eos(row) for row in torch.stack(out, 1).tolist()]

    @torch.no_grad()
    def beam_search(self, src, src_lengths, beam: int, length_penalty: float, max_len: int) -> list[list[int]]:
        """Batched beam search. Each step extends every live hypothesis by every token and keeps the best
        2 x beam; an EOS among the best ``beam`` closes a hypothesis, scored log P / lp(|Y|), and the best
        ``beam`` others live on. A sentence is done when it holds ``beam`` closed hypotheses; its best
        closed one is the answer (the best live one if none closed within ``max_len``). beam=1 is greedy."""
        if beam < 1:
            raise ValueError(f"beam size must be >= 1, got {beam}")
        memory, keys, mask, states = self.encode(src, src_lengths)
        batch, device = src.shape[0], src.device
        states = self._zero_states(states, batch, memory)
        expand = lambda t: t.repeat_interleave(beam, dim=0)  # noqa: E731
        memory, keys, mask = expand(memory), expand(keys), expand(mask)
        states = [(expand(h), expand(c)) for h, c in states]
        context = memory.new_zeros(batch * beam, memory.shape[-1])
        scores = torch.full((batch, beam), float("-inf"), device=device)
        scores[:, 0] = 0.0  # all beams start equal: only the first one is extended at step 1
        history = torch.full((batch * beam, 0), BOS, dtype=torch.long, device=device)
        tokens = torch.full((batch * beam,), BOS, dtype=torch.long, device=device)
        best: list[tuple[float, list[int]] | None] = [None] * batch
        closed = [0] * batch
        offsets = (torch.arange(batch, device=device) * beam).unsqueeze(1)
        for t in range(max_len):
            log_probs, context, states = self._log_probs(tokens, context, states, memory, keys, mask)
            vocab = log_probs.shape[-1]
            candidates = (scores.reshape(-1, 1) + log_probs).reshape(batch, beam * vocab)
            top_scores, top_index = candidates.topk(min(2 * beam, beam * vocab), dim=1)
            top_beam, top_token = top_index // vocab, top_index % vocab
            is_eos = top_token == EOS
            penalty = ((5.0 + t + 1) / 6.0) ** length_penalty
            for b, k in (is_eos[:, :beam] & torch.isfinite(top_scores[:, :beam])).nonzero().tolist():
                if closed[b] >= beam:
                    continue
                closed[b] += 1
                score = top_scores[b, k].item() / penalty
                if best[b] is None or score > best[b][0]:
                    best[b] = (score, history[offsets[b, 0] + top_beam[b, k]].tolist())
            if all(n >= beam for n in closed):
                break
            keep = torch.sort(is_eos.int(), dim=1, stable=True).indices[:, :beam]  # the best non-EOS
            scores = top_scores.gather(1, keep)
            rows = (offsets + top_beam.gather(1, keep)).reshape(-1)
            tokens = top_token.gather(1, keep).reshape(-1)
            history = torch.cat([history[rows], tokens.unsqueeze(1)], dim=1)
            context = context[rows]
            states = [(h[rows], c[rows]) for h, c in states]
        results = []
        for b in range(batch):
            if best[b] is None:  # nothing closed within max_len: the best live hypothesis
                results.append(_until_eos(history[b * beam + int(scores[b].argmax())].tolist()))
            else:
                results.append(best[b][1])
        return results


def _until_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS)] if EOS in ids else ids
