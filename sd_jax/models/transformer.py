"""A small decoder-only Transformer language model whose projections are zoo dense layers.

`TransformerLM` (pre-layer-norm, GPT-2 style): tokens (batch, length) -> embedding -> `num_layers`
blocks of causal multi-head self-attention and an MLP, each on a layer-normed input and added back ->
final layer norm -> head -> logits (batch, length, num_classes) over the vocabulary. Positions are
sinusoidal (Vaswani et al. 2017), so there are no position parameters and any length up to `context`
works.

Every kernel is a dense layer of the `dense` factory, so `models.get("transformer_lm", sd=rules)`
makes any of them SD by the usual rules: the embedding is `embed/dense` applied to one-hot tokens (a
lookup written as a matrix product; the analyzer counts it as vocabulary x width MACs per
token; its bias is one more vector added to every embedding), the attention projections `block{i}/attention/{query,key,value,out}`, the MLP
`block{i}/mlp/{dense1,dense2}` and the head `head/dense` (separate from the embedding, not tied).
The attention score and value products (2 x length x width MACs per token and block) are no layers:
the analyzer leaves them out.

Token ids come as integers; float inputs holding ids (the zeros other commands probe a model with)
are cast to int32.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.models.common import ModuleFactory, check_layout, layer


def sinusoidal_positions(length: int, width: int) -> np.ndarray:
    """(length, width) float32: sin on the even, cos on the odd features, wavelengths up to 10000 x 2 pi."""
    position = np.arange(length)[:, None]
    frequency = np.exp(-np.log(10000.0) * np.arange(0, width, 2) / width)[None, :]
    table = np.zeros((length, width), np.float32)
    table[:, 0::2] = np.sin(position * frequency)
    table[:, 1::2] = np.cos(position * frequency)[:, :width // 2]
    return table


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention over earlier positions only; `query`, `key`, `value`, `out` dense layers."""

    width: int
    heads: int
    dense: ModuleFactory
    dtype: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        batch, length, _ = x.shape
        split = lambda name: layer(self, self.dense, name, features=self.width)(x).reshape(
            batch, length, self.heads, self.width // self.heads)  # (batch, length, heads, head width)
        query, key, value = split("query"), split("key"), split("value")
        causal = nn.make_causal_mask(jnp.ones((batch, length), bool))
        attended = nn.dot_product_attention(query, key, value, mask=causal, dtype=self.dtype)
        return layer(self, self.dense, "out", features=self.width)(attended.reshape(batch, length, self.width))


class MLP(nn.Module):
    """`dense1` to `hidden` features, GELU, `dense2` back to `width`."""

    width: int
    hidden: int
    dense: ModuleFactory
    dtype: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = nn.gelu(layer(self, self.dense, "dense1", features=self.hidden)(x))
        return layer(self, self.dense, "dense2", features=self.width)(x)


class Block(nn.Module):
    """x + attention(norm1(x)), then x + mlp(norm2(x))."""

    width: int
    heads: int
    hidden: int
    dense: ModuleFactory
    dtype: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x + CausalSelfAttention(self.width, self.heads, self.dense, self.dtype, name="attention")(
            nn.LayerNorm(dtype=self.dtype, name="norm1")(x))
        return x + MLP(self.width, self.hidden, self.dense, self.dtype, name="mlp")(
            nn.LayerNorm(dtype=self.dtype, name="norm2")(x))


class Embed(nn.Module):
    """`dense` on one-hot tokens, times sqrt(width), plus sinusoidal positions."""

    vocabulary: int
    width: int
    dense: ModuleFactory
    dtype: Any

    @nn.compact
    def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
        one_hot = jax.nn.one_hot(tokens, self.vocabulary, dtype=self.dtype)  # (batch, length, vocabulary)
        x = layer(self, self.dense, "dense", features=self.width)(one_hot)
        return x * np.sqrt(self.width) + sinusoidal_positions(tokens.shape[1], self.width).astype(x.dtype)


class Head(nn.Module):
    """`head`: the `dense` layer from features to vocabulary logits at every position."""

    num_classes: int
    dense: ModuleFactory
    dtype: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return layer(self, self.dense, "dense", features=self.num_classes)(x)


class TransformerLM(nn.Module):
    """Decoder-only Transformer: (batch, length) token ids -> (batch, length, num_classes) float32 logits."""

    num_classes: int  # the vocabulary (256 bytes for fortunes_chars)
    num_layers: int = 4
    width: int = 128
    heads: int = 4
    mlp_ratio: int = 4
    context: int = 128
    dense: ModuleFactory = nn.Dense
    conv: ModuleFactory = nn.Conv  # unused; kept so every model takes the same factories
    dtype: Any = jnp.float32

    PROBE_SHAPE = (1, 8)  # the input `models.layer_names` traces it with

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        del train  # no dropout, no batch norm: training and evaluation compute the same function
        if tokens.ndim != 2 or tokens.shape[1] > self.context:
            raise ValueError(f"model 'transformer_lm': input shape {tuple(tokens.shape)} is not (batch, length) "
                             f"with length <= context {self.context}; pass token ids (or raise context)")
        if self.width % self.heads:
            raise ValueError(f"model 'transformer_lm': width {self.width} is not a multiple of heads {self.heads}; "
                             "pick a width that the heads divide")
        check_layout(self)
        x = Embed(self.num_classes, self.width, self.dense, self.dtype, name="embed")(tokens.astype(jnp.int32))
        for index in range(self.num_layers):
            x = Block(self.width, self.heads, self.mlp_ratio * self.width, self.dense, self.dtype,
                      name=f"block{index}")(x)
        x = nn.LayerNorm(dtype=self.dtype, name="final_norm")(x)
        return jnp.asarray(Head(self.num_classes, self.dense, self.dtype, name="head")(x), jnp.float32)
