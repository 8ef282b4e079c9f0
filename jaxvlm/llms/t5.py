"""T5 / FlanT5 encoder-decoder (Raffel et al., 2020, "Exploring the Limits of Transfer Learning with
a Unified Text-to-Text Transformer"; FlanT5: Chung et al., 2022), by fields.

A port of transformers' `T5ForConditionalGeneration` (`modeling_t5.py`): a prefix enters the
encoder, the decoder writes the suffix. The math, as there:
  - one token table `shared [V, dim]` for both stacks (BLIP-2 puts its query outputs in front of
    the encoder input as a soft prompt: `encode(embeddings=...)` with `embed(tokens)` for the text);
  - pre-norm blocks with T5's RMS layer norm (no mean, no bias: `layers.norms.RMSNorm`):
    encoder `x += attn(norm(x)); x += ff(norm(x))`, decoder with `x += cross_attn(norm(x), enc)`
    between the two; a final norm per stack;
  - attention without the 1/sqrt(d) scaling and without biases, `num_heads` heads of `head_dim`
    (HF `d_kv`, not necessarily dim / num_heads), plus a learned relative position bias: each
    (query, key) distance falls into one of `relative_attention_num_buckets` buckets (exact below
    half of them, logarithmic up to `relative_attention_max_distance`), bidirectional in the
    encoder and causal in the decoder; one table per stack (HF keeps it in block 0 and shares the
    bias with every later block), none on cross-attention;
  - feed-forward `wo(act(wi(x)))` with `hidden_act="relu"` (T5) or gated
    `wo(gelu_tanh(wi_0(x)) · wi_1(x))` (`gated_mlp=True`, HF `feed_forward_proj="gated-gelu"`:
    T5 v1.1, FlanT5), without biases;
  - the head: tied to `shared` (`tie_embeddings`) or an untied `lm_head` (FlanT5); with
    `scale_decoder_outputs` (original T5, tied) the decoder output is multiplied by dim**-0.5
    first.
Deviations: no dropout (a frozen backbone here); no fp16 inf-clamping (HF clamps only in float16,
which we do not use; bfloat16 has float32's range).

Parameter layout: `shared/embedding` (+ `added_embedding` with `num_added_embeddings`),
`{encoder,decoder}/relative_attention_bias/embedding [buckets, H]`, `{encoder,decoder}/layers`
stacked [depth, ...] (`scan_layers`) or `layers_{i}`, each block with `self_attn_norm`,
`self_attn.{q,k,v,o}_proj`, decoder only `cross_attn_norm`, `cross_attn.{q,k,v,o}_proj`, then
`mlp_norm`, `mlp.{fc1,fc2}` (relu) or `mlp.{gate_proj,up_proj,down_proj}` (gated);
`{encoder,decoder}/final_layer_norm`; `lm_head/kernel` when untied.

Decoding: `init_cache` gives a `T5Cache` for the decoder's self-attention keys and values, and
an empty (length 0) slot for the cross-attention ones. The first `decode` call on it projects the
encoder output to every layer's cross-attention keys and values and stores them; later calls
reuse them (a static check of their length, so no branch is traced), saving 2 projections of
[B, S, D] per layer and step. The cache keeps one structure, with batch on axis 1 of the
per-layer arrays and on axis 0 of the others, so beam search can repeat and reorder it;
`encoder_mask` is read from the call every time. `t5_decoder` wraps all this as a
`decoding.Decoder`: the encoder output and its mask travel in `decoder_inputs`, and the decoder
prompt is `[decoder_start_token_id]` (HF uses the pad id). `t5_generate` does the whole of HF's
`generate` for an encoder-decoder: encode once, then greedy, sampling or beam search on the decoder
(tests/test_beam_search_t5.py: identical ids to transformers for beams 1, 3, 5).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxvlm.decoding import Decoder, Decoding, GenerateOutput, generate
from jaxvlm.layers.attention import Attention, KVCache
from jaxvlm.layers.embeddings import Embed, LMHead
from jaxvlm.layers.masks import make_attention_mask
from jaxvlm.layers.mlp import Mlp
from jaxvlm.layers.norms import RMSNorm
from jaxvlm.layers.remat import maybe_remat
from jaxvlm.llms.llama import DecoderOutput
from jaxvlm.llms.stack import layer_slice, scanned, stack_trees

__all__ = [
    "RelativePositionBias",
    "T5",
    "T5Block",
    "T5Cache",
    "T5Stack",
    "relative_position_bucket",
    "t5_decoder",
    "t5_generate",
]

EMBED_ACTIVATION = ("batch", "length", "embed")


def relative_position_bucket(
    relative_position: jax.Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's bucket of each key-minus-query distance (HF `T5Attention._relative_position_bucket`).

    Half the buckets (per direction when bidirectional) hold the small distances exactly, the
    rest grow logarithmically up to `max_distance`, beyond which all share the last bucket; a
    causal stack maps every future key (distance > 0) to bucket 0. The logarithm runs in float32
    in HF's operation order so that bucket edges round as there (tests check every distance).

    Args: relative_position int[...]. Returns int32[...] in [0, num_buckets).
    """
    relative_position = relative_position.astype(jnp.int32)
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    # max(·, max_exact) keeps log(0) out of the branch that `where` discards.
    ratio = jnp.maximum(distance, max_exact).astype(jnp.float32) / max_exact
    scaled = jnp.log(ratio) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
    return buckets + jnp.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """The attention bias of T5's relative positions: `embedding [buckets, H]` read per distance.

    Args of `__call__`: query_positions int[B, Tq], key_positions int[B, Tk].
    Returns float[B, H, Tq, Tk] in `dtype`.
    """

    num_heads: int
    num_buckets: int
    max_distance: int
    bidirectional: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        embedding = self.param(
            "embedding",
            # Buckets are not a sharded axis (None: replicated on purpose).
            nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), (None, "heads")),
            (self.num_buckets, self.num_heads),
            self.param_dtype,
        )
        relative = key_positions[:, None, :] - query_positions[:, :, None]  # [B, Tq, Tk]
        buckets = relative_position_bucket(
            relative,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        bias = jnp.take(embedding, buckets, axis=0)  # [B, Tq, Tk, H]
        return jnp.transpose(bias, (0, 3, 1, 2)).astype(self.dtype)


@struct.dataclass
class T5Cache:
    """The decoder's cache.

    k, v: float[L, B, T, H, Dh] — per decoder layer, self-attention keys and values.
    cross_k, cross_v: float[L, B, S, H, Dh] — per decoder layer, the encoder output's
      cross-attention keys and values; S = 0 until the first `decode` call fills them.
    positions: int32[B, T] — the position of each slot's token.
    kv_mask: bool[B, T] — True for slots holding real (non-padding) tokens.
    index: int32[] — the number of slots written.
    """

    k: jax.Array
    v: jax.Array
    cross_k: jax.Array
    cross_v: jax.Array
    positions: jax.Array
    kv_mask: jax.Array
    index: jax.Array


class T5Block(nn.Module):
    """One T5 block (HF `T5Block`): self-attention, cross-attention (decoder), feed-forward.

    Args of `__call__`:
      x: float[B, T, D].
      cache: None, or (self-attention `KVCache`, (cross_k, cross_v) float[B, S, H, Dh]) — an
        empty (S = 0) cross pair is computed from `encoder_output`, a full one is reused.
      mask: bool[B, 1, T, T or slots]; bias: float[B or 1, H, T, T or slots], the relative
        position bias.
      encoder_output: float[B, S, D] (decoder); cross_mask: bool[B, 1, T, S].
    Returns (float[B, T, D], None without a cache, else (the updated `KVCache`, the cross pair
    computed in this call or None when it was reused)).
    """

    num_heads: int
    head_dim: int
    mlp_dim: int
    hidden_act: str = "relu"
    gated_mlp: bool = False
    cross_attention: bool = False
    rms_norm_eps: float = 1e-6
    implementation: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cache, mask, bias, encoder_output, cross_mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attention = functools.partial(
            Attention,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            scale=1.0,  # T5 does not scale q·k (the scale lives in its initialisation)
            implementation=self.implementation,
            **kw,
        )
        self_cache, cross = (None, None) if cache is None else cache
        x = nn.with_logical_constraint(x, EMBED_ACTIVATION)
        h = RMSNorm(self.rms_norm_eps, name="self_attn_norm", **kw)(x)
        attended = attention(name="self_attn")(h, mask=mask, bias=bias, cache=self_cache)
        x = x + attended.hidden
        new_cross = None
        if self.cross_attention:
            reuse = cross is not None and cross[0].shape[1] > 0
            h = RMSNorm(self.rms_norm_eps, name="cross_attn_norm", **kw)(x)
            crossed = attention(name="cross_attn")(
                h,
                None if reuse else encoder_output,
                mask=cross_mask,
                keys_values=cross if reuse else None,
            )
            x = x + crossed.hidden
            new_cross = None if reuse else crossed.keys_values
        h = RMSNorm(self.rms_norm_eps, name="mlp_norm", **kw)(x)
        x = x + Mlp(
            self.mlp_dim,
            activation=self.hidden_act,
            gated=self.gated_mlp,
            use_bias=False,
            name="mlp",
            **kw,
        )(h)
        x = nn.with_logical_constraint(x, EMBED_ACTIVATION)
        return x, None if cache is None else (attended.cache, new_cross)


class T5Stack(nn.Module):
    """The encoder (`causal=False`) or decoder (`causal=True`, with cross-attention) stack.

    Args of `__call__`: x float[B, T, D] (embedded); mask bool[B, 1, T, T or slots];
    query_positions int[B, T]; key_positions int[B, T or slots]; cache (per-layer stacked, see
    `T5Block`) or None; encoder_output float[B, S, D] and cross_mask bool[B, 1, T, S] (decoder).
    Returns (final-normed float[B, T, D], the per-layer stacked new caches or None).
    """

    depth: int
    causal: bool
    num_heads: int
    head_dim: int
    mlp_dim: int
    hidden_act: str = "relu"
    gated_mlp: bool = False
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    rms_norm_eps: float = 1e-6
    scan_layers: bool = True
    remat: str = "none"
    implementation: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x,
        *,
        mask,
        query_positions,
        key_positions,
        cache=None,
        encoder_output=None,
        cross_mask=None,
    ):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # HF computes this in block 0 and hands it to every later block: one table per stack.
        bias = RelativePositionBias(
            num_heads=self.num_heads,
            num_buckets=self.relative_attention_num_buckets,
            max_distance=self.relative_attention_max_distance,
            bidirectional=not self.causal,
            name="relative_attention_bias",
            **kw,
        )(query_positions, key_positions)
        block = maybe_remat(T5Block, self.remat, scanned=self.scan_layers)
        fields = dict(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            mlp_dim=self.mlp_dim,
            hidden_act=self.hidden_act,
            gated_mlp=self.gated_mlp,
            cross_attention=self.causal,
            rms_norm_eps=self.rms_norm_eps,
            implementation=self.implementation,
            **kw,
        )
        args = (mask, bias, encoder_output, cross_mask)
        if self.scan_layers:
            layers = scanned(block, self.depth, len(args))(**fields, name="layers")
            x, new_cache = layers(x, cache, *args)
        else:
            new_caches = []
            for i in range(self.depth):
                x, layer_cache = block(**fields, name=f"layers_{i}")(
                    x, layer_slice(cache, i), *args
                )
                new_caches.append(layer_cache)
            new_cache = stack_trees(new_caches)
        return RMSNorm(self.rms_norm_eps, name="final_layer_norm", **kw)(x), new_cache


class T5(nn.Module):
    """Encoder tokens (or embeddings) → encoder states; decoder tokens → next-token logits.

    See the module docstring for the math, the parameter layout and the cache. Sizes follow the
    HF config: dim = d_model, depth = num_layers, decoder_depth = num_decoder_layers, head_dim =
    d_kv, mlp_dim = d_ff.
    """

    vocab_size: int
    dim: int
    depth: int
    decoder_depth: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    hidden_act: str = "relu"
    gated_mlp: bool = False
    tie_embeddings: bool = True
    scale_decoder_outputs: bool = True
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    rms_norm_eps: float = 1e-6
    num_added_embeddings: int = 0
    scan_layers: bool = True
    remat: str = "none"
    implementation: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # HF initialises `shared` with std 1 (T5's logits scale comes from dim**-0.5).
        self.shared = Embed(
            self.vocab_size,
            self.dim,
            self.num_added_embeddings,
            embedding_init=nn.initializers.normal(stddev=1.0),
            **kw,
        )
        stack = functools.partial(
            T5Stack,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            mlp_dim=self.mlp_dim,
            hidden_act=self.hidden_act,
            gated_mlp=self.gated_mlp,
            relative_attention_num_buckets=self.relative_attention_num_buckets,
            relative_attention_max_distance=self.relative_attention_max_distance,
            rms_norm_eps=self.rms_norm_eps,
            scan_layers=self.scan_layers,
            remat=self.remat,
            implementation=self.implementation,
            **kw,
        )
        self.encoder = stack(depth=self.depth, causal=False)
        self.decoder = stack(depth=self.decoder_depth, causal=True)
        if not self.tie_embeddings:
            self.lm_head = LMHead(self.vocab_size, self.num_added_embeddings, **kw)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens: int[B, T] in [0, vocab_size + num_added_embeddings). Returns float[B, T, D]."""
        return self.shared(tokens)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden: float[B, T, D] (the decoder's final normed states). Returns float32[B, T, V+A]."""
        if self.scale_decoder_outputs:
            hidden = hidden * self.dim**-0.5
        if self.tie_embeddings:
            return self.shared.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def encode(
        self,
        tokens: jax.Array | None = None,
        mask: jax.Array | None = None,
        *,
        embeddings: jax.Array | None = None,
    ) -> jax.Array:
        """The encoder's final normed states.

        Args:
          tokens: int[B, S], or `embeddings` float[B, S, D] (e.g. a soft prompt followed by
            `embed(text tokens)`).
          mask: bool[B, S] — True for real tokens (padding may sit on either side: the relative
            bias depends only on distances). Default: all real.

        Returns:
          float[B, S, D].
        """
        x = self._embed_input(tokens, embeddings)
        batch_size, length = x.shape[:2]
        mask = jnp.ones((batch_size, length), bool) if mask is None else mask.astype(bool)
        positions = jnp.broadcast_to(jnp.arange(length), (batch_size, length))
        hidden, _ = self.encoder(
            x,
            mask=make_attention_mask(kv_mask=mask),
            query_positions=positions,
            key_positions=positions,
        )
        return hidden

    def decode(
        self,
        tokens: jax.Array | None = None,
        encoder_output: jax.Array | None = None,
        encoder_mask: jax.Array | None = None,
        *,
        embeddings: jax.Array | None = None,
        positions: jax.Array | None = None,
        kv_mask: jax.Array | None = None,
        cache: T5Cache | None = None,
    ) -> DecoderOutput:
        """Runs the decoder on T new tokens against the encoder output.

        Args:
          tokens: int[B, T] (the first is `decoder_start_token_id`), or `embeddings` float[B, T, D].
          encoder_output: float[B, S, D] from `encode`; may be None once `cache` holds the
            cross-attention keys and values (every call after the first on a cache).
          encoder_mask: bool[B, S] — True for real encoder tokens. Default: all real.
          positions: int[B, T] — defaults to `cache.index + arange(T)` (0 without a cache).
          kv_mask: bool[B, T] — False for padding decoder tokens. Default: all real.
          cache: a `T5Cache` to extend (see `init_cache`).

        Returns:
          DecoderOutput(logits float32[B, T, V + A], hidden float[B, T, D], cache).
        """
        x = self._embed_input(tokens, embeddings)
        batch_size, length = x.shape[:2]
        start = jnp.zeros((), jnp.int32) if cache is None else cache.index
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(length), (batch_size, length))
        if kv_mask is None:
            kv_mask = jnp.ones((batch_size, length), bool)
        kv_positions, kv_mask = _write_slots(cache, positions, kv_mask.astype(bool))
        filled = cache is not None and cache.cross_k.shape[2] > 0
        if not filled and encoder_output is None:
            raise ValueError("T5.decode: encoder_output is needed without a filled cache")
        if encoder_mask is None:
            source_length = (cache.cross_k if filled else encoder_output).shape[-3]
            encoder_mask = jnp.ones((batch_size, source_length), bool)
        layer_cache = None
        if cache is not None:
            self_cache = KVCache(cache.k, cache.v, jnp.full((self.decoder_depth,), cache.index))
            layer_cache = (self_cache, (cache.cross_k, cache.cross_v))
        hidden, layer_cache = self.decoder(
            x,
            mask=make_attention_mask(
                kv_mask=kv_mask,
                causal=True,
                query_positions=positions,
                kv_positions=kv_positions,
            ),
            query_positions=positions,
            key_positions=kv_positions,
            cache=layer_cache,
            encoder_output=None if filled else encoder_output,
            cross_mask=make_attention_mask(kv_mask=encoder_mask.astype(bool), query_length=length),
        )
        if cache is not None:
            cache = _advance(cache, layer_cache, kv_positions, kv_mask, length)
        return DecoderOutput(logits=self.logits(hidden), hidden=hidden, cache=cache)

    def __call__(
        self,
        tokens: jax.Array | None,
        decoder_tokens: jax.Array,
        *,
        mask: jax.Array | None = None,
        decoder_mask: jax.Array | None = None,
        embeddings: jax.Array | None = None,
    ) -> DecoderOutput:
        """Teacher forcing: encoder input → logits for every decoder position.

        Args:
          tokens: int[B, S] (or None with `embeddings` float[B, S, D]); mask: bool[B, S].
          decoder_tokens: int[B, T] — the targets shifted right behind `decoder_start_token_id`;
          decoder_mask: bool[B, T] — False for padding.

        Returns:
          DecoderOutput(logits float32[B, T, V + A], hidden float[B, T, D], cache None).
        """
        encoder_output = self.encode(tokens, mask, embeddings=embeddings)
        return self.decode(decoder_tokens, encoder_output, mask, kv_mask=decoder_mask)

    def init_cache(self, batch_size: int, max_length: int) -> T5Cache:
        """An empty decoder cache of `max_length` slots; needs no parameters."""
        shape = (self.decoder_depth, batch_size, max_length, self.num_heads, self.head_dim)
        empty_cross = jnp.zeros((*shape[:2], 0, *shape[3:]), self.dtype)
        return T5Cache(
            k=jnp.zeros(shape, self.dtype),
            v=jnp.zeros(shape, self.dtype),
            cross_k=empty_cross,
            cross_v=empty_cross,
            positions=jnp.zeros((batch_size, max_length), jnp.int32),
            kv_mask=jnp.zeros((batch_size, max_length), bool),
            index=jnp.zeros((), jnp.int32),
        )

    def _embed_input(self, tokens, embeddings) -> jax.Array:
        if (tokens is None) == (embeddings is None):
            raise ValueError("T5: pass exactly one of tokens and embeddings")
        x = self.embed(tokens) if embeddings is None else embeddings.astype(self.dtype)
        return nn.with_logical_constraint(x, EMBED_ACTIVATION)


def _write_slots(cache: T5Cache | None, positions: jax.Array, kv_mask: jax.Array):
    """(positions, kv_mask) of every self-attention key: the new tokens' written into the
    cache's slots at `cache.index` ([B, slots]), or the new tokens' alone ([B, T]) without one."""
    if cache is None:
        return positions, kv_mask
    write = lambda buffer, new: jax.lax.dynamic_update_slice(
        buffer, new.astype(buffer.dtype), (0, cache.index)
    )
    return write(cache.positions, positions), write(cache.kv_mask, kv_mask)


def _advance(cache: T5Cache, layer_cache, kv_positions, kv_mask, length: int) -> T5Cache:
    """The cache after a `decode` call on `length` tokens; layer_cache is the stack's
    (self-attention `KVCache`, cross pair computed in the call or None when reused)."""
    self_cache, computed = layer_cache
    cross_k, cross_v = (cache.cross_k, cache.cross_v) if computed is None else computed
    return T5Cache(
        k=self_cache.k,
        v=self_cache.v,
        cross_k=cross_k.astype(cache.k.dtype),
        cross_v=cross_v.astype(cache.v.dtype),
        positions=kv_positions,
        kv_mask=kv_mask,
        index=cache.index + length,
    )


@functools.cache
def t5_decoder(model: T5, scope: str | None = "llm") -> Decoder:
    """A `decoding.Decoder` for a `T5` whose parameters are `params[scope]` (all if None).

    Give `decoding.generate` the decoder prompt `[[decoder_start_token_id]] * B` with mask 1 and
    `decoder_inputs=dict(encoder_output=float[B, S, D], encoder_mask=bool[B, S])` (from
    `T5.encode`). The first call fills the cache's cross-attention keys and values from
    `encoder_output`; later calls reuse them. Cached per (model, scope), so compiled programs are
    reused.
    """

    def apply(params, *, encoder_output, encoder_mask, **kwargs):
        variables = {"params": params if scope is None else params[scope]}
        return model.apply(
            variables,
            encoder_output=encoder_output,
            encoder_mask=encoder_mask,
            method=T5.decode,
            **kwargs,
        )

    return Decoder(apply=apply, init_cache=model.init_cache)


@functools.cache
def _compiled_encode(model: T5, scope: str | None):
    """One jitted `T5.encode` per (model, scope); jax.jit adds one per input shapes."""

    def encode(params, tokens, mask, embeddings):
        variables = {"params": params if scope is None else params[scope]}
        return model.apply(variables, tokens, mask, embeddings=embeddings, method=T5.encode)

    return jax.jit(encode)


def t5_generate(
    model: T5,
    params,
    tokens: jax.Array | None,
    mask: jax.Array | None = None,
    *,
    embeddings: jax.Array | None = None,
    max_new_tokens: int,
    eos_id: int | tuple[int, ...] | None,
    pad_id: int,
    decoder_start_id: int,
    stop_ids: tuple[int, ...] = (),
    decoding: Decoding | None = None,
    scope: str | None = "llm",
    seed: int = 0,
    example_indices: jax.Array | None = None,
) -> GenerateOutput:
    """Encoder input → generated decoder tokens, as transformers' `generate` for T5.

    The encoder runs once (jitted); `decoding.generate` then decodes from the prompt
    `[decoder_start_id]` (HF's `decoder_start_token_id`, the pad id for T5) with the encoder
    output and mask as `decoder_inputs` (beam search repeats them per beam). The start token is
    not part of the output (HF's `sequences[:, 1:]`).

    Args:
      model, params: a `T5` and its parameters, `params[scope]` (all of `params` if scope None).
      tokens: int[B, S] encoder input, padded on either side; or None with `embeddings`
        float[B, S, D] (e.g. BLIP-2's query outputs followed by `T5.embed(text tokens)`).
      mask: int or bool[B, S] — 1 for real encoder tokens. Default: all real.
      max_new_tokens, eos_id, pad_id, stop_ids, seed, example_indices: as `decoding.generate`.
      decoding: greedy (None, the default), sampling or beam search settings (`Decoding`).
      decoder_start_id: the decoder's first input token.

    Returns:
      GenerateOutput(tokens int32[B·R, N], lengths int32[B·R], scores float32[B·R] or None), R
      = `decoding.num_return_sequences`.
    """
    source = tokens if embeddings is None else embeddings
    if source is None:
        raise ValueError("t5_generate: pass tokens or embeddings")
    batch_size, length = source.shape[:2]
    mask = jnp.ones((batch_size, length), bool) if mask is None else jnp.asarray(mask, bool)
    tokens = None if tokens is None else jnp.asarray(tokens, jnp.int32)
    encoded = _compiled_encode(model, scope)(params, tokens, mask, embeddings)
    return generate(
        t5_decoder(model, scope),
        params,
        jnp.full((batch_size, 1), decoder_start_id, jnp.int32),
        jnp.ones((batch_size, 1), bool),
        max_new_tokens=max_new_tokens,
        eos_id=eos_id,
        pad_id=pad_id,
        stop_ids=stop_ids,
        decoding=Decoding() if decoding is None else decoding,
        seed=seed,
        example_indices=example_indices,
        decoder_inputs=dict(encoder_output=encoded, encoder_mask=mask),
    )
