"""``TensorParallelTransformer``: one rank's shard of a Llama-family stack.

It *is* a :class:`~hybridkernels.models.Transformer` (so ``DiffusionPlanner`` and ``ARExecutor``
take it) of the rank's :func:`~hybridkernels.distributed.sharding.local_config`, whose
``o_proj`` / ``down_proj`` are :class:`RowParallelLinear` (all-reduced) and whose embedding is
:class:`VocabParallelEmbedding`; its LM head is the rank's vocabulary rows. The attention and the
caches see the rank's heads only; ``config.vocab_size`` stays the model's (token ids are global).

What it adds for the fast paths (the planner and the executor pick them through the model):

* :meth:`unmask_step`: ``ops.unmask_step`` with the vocabulary split across ranks (per-rank
  partials, one all-gather of ``[B, Lr, 9]`` float64, the merge, the same commit on every rank).
* :meth:`next_tokens`: the executor's token choice: at temperature 0 a vocabulary-parallel argmax
  (one all-gather of ``[N, 2]``); sampled, the full logits are gathered (``[N, V]``) and
  :func:`hybridkernels.common.sample_tokens` draws exactly as on one device.
* :meth:`logits`: full ``[..., V]`` logits (all-gathered), for callers that want them (the
  executor's prefill takes its first token from them).

Randomness: sample with the same seed on every rank (``ARExecutor.generate(seed=...)``,
generators passed to the planner); ``seed=None`` seeds each rank's executor generator afresh and
the first token, drawn from the prefill's gathered logits, could differ between ranks.
``hybridkernels generate --tp`` hands rank 0's seed to every rank.

Exactness against one process on the same checkpoint: the embedding and the LM head's logits are
bit-identical (a sum of one value and zeros; the same dot products); the row-parallel all-reduces
sum partial products in another order than one matmul, so hidden states differ by float rounding
(~1e-7 relative in fp32). Tokens are therefore identical unless two candidates' scores are within
rounding of each other; on the tests' tiny fp32 models they are identical, at T=0 and with seeded
sampling. In bf16 / fp16 expect rare divergences after a near-tie, as between any two GEMM
libraries.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..common import sample_tokens
from ..models import checkpoint
from ..models.config import TransformerConfig
from ..models.transformer import MODEL_DTYPES, Transformer
from .group import TPGroup, check_same, checkpoint_fingerprint
from .layers import RowParallelLinear, VocabParallelEmbedding
from .loading import LoadStats, load_shard
from .sharding import local_config, parameter_slice, vocab_chunk, vocab_range


class TensorParallelTransformer(Transformer):
    """Rank ``tp.rank``'s shard of a model of (full) ``config``; built on the meta device, filled
    by :meth:`from_pretrained` / :meth:`from_full_model` (``load_state_dict(assign=True)``).

    ``tp_group``: a :class:`TPGroup`, a ``ProcessGroup``, or None (the default group, else one
    process)."""

    def __init__(
        self,
        config: TransformerConfig,
        *,
        tp_group=None,
        dtype: torch.dtype | None = None,
        device=None,
        causal: bool | None = None,
        attention_backend: str | None = None,
    ):
        tp = TPGroup.of(tp_group)
        local = local_config(config, tp.world_size)
        super().__init__(
            local, dtype=dtype, device="meta", causal=causal, attention_backend=attention_backend
        )
        self.tp = tp
        self.full_config = config
        self.vocab_start, self.vocab_stop = vocab_range(config.vocab_size, tp.rank, tp.world_size)
        kw = dict(device="meta", dtype=dtype)
        d = config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(self.vocab_start, self.vocab_stop, d, group=tp, **kw)
        if self.lm_head is not None:
            self.lm_head = torch.nn.Linear(d, self.vocab_stop - self.vocab_start, bias=False, **kw)
        for block in self.layers:
            attn, mlp = block.self_attn, block.mlp
            attn.o_proj = RowParallelLinear(local.q_size, d, bias=local.o_bias, group=tp, **kw)
            mlp.down_proj = RowParallelLinear(local.intermediate_size, d, bias=local.mlp_bias, group=tp, **kw)
        self.load_stats: LoadStats | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        tp_group=None,
        dtype: torch.dtype | None = None,
        device=None,
        causal: bool | None = None,
        attention_backend: str | None = None,
        names: str = "auto",
        config_overrides=None,
        check_ranks: bool = True,
    ) -> TensorParallelTransformer:
        """This rank's shard of checkpoint ``path`` (arguments as :meth:`Transformer.from_pretrained`;
        ``device`` default: the current CUDA device with NCCL, else the CPU).

        Reads only the rank's slices (``safe_open(...).get_slice``); :attr:`load_stats` says how
        many bytes. With ``check_ranks`` every rank first all-gathers a hash of its arguments and
        of the checkpoint's files and config, and all raise the same ``ValueError`` if they differ.
        A world size that does not divide the heads, kv heads or intermediate size raises a
        ``ValueError`` on every rank (before any collective of the model)."""
        tp = TPGroup.of(tp_group)
        if check_ranks:
            args = dict(dtype=str(dtype), causal=causal, names=names, overrides=config_overrides)
            check_same(
                tp,
                {"args": args, "checkpoint": checkpoint_fingerprint(path)},
                "the checkpoint or its options",
            )
        config = checkpoint.read_config(path, config_overrides)
        local_config(config, tp.world_size)  # the divisibility error before reading anything
        state, stats = load_shard(path, config, tp.rank, tp.world_size, names=names)
        model = cls._build(config, state, tp, dtype, device or tp.default_device(), causal, attention_backend)
        model.load_stats = stats
        return model

    @classmethod
    def from_full_model(cls, model: Transformer, *, tp_group=None, device=None) -> TensorParallelTransformer:
        """This rank's shard of an in-memory model (its slices copied; for tests and small models)."""
        tp = TPGroup.of(tp_group)
        config = model.config
        state = {}
        for name, t in model.state_dict().items():
            sl = parameter_slice(name, config, tp.rank, tp.world_size)
            state[name] = t if sl is None else t.narrow(sl.dim, sl.start, sl.stop - sl.start)
        state = {n: t.clone() for n, t in state.items()}
        return cls._build(
            config, state, tp, model.dtype, device or model.device, model.causal, model.attention_backend
        )

    @classmethod
    def random(
        cls, config: TransformerConfig, *, tp_group=None, dtype=None, device=None, seed: int = 0, **kwargs
    ) -> TensorParallelTransformer:
        """A shard with random weights (:meth:`reset_parameters`, seeded by ``seed`` and the rank),
        for benchmarks: no checkpoint. ``kwargs``: ``causal``, ``attention_backend``."""
        model = cls(config, tp_group=tp_group, dtype=dtype, **kwargs).to_empty(device=device or "cpu")
        gen = torch.Generator(device or "cpu").manual_seed(seed * 1009 + model.tp.rank)
        return model.reset_parameters(generator=gen).fuse_projections().eval()

    @torch.no_grad()
    def reset_parameters(self, std: float | None = None, generator: torch.Generator | None = None):
        """:meth:`Transformer.reset_parameters`, the sharded layers included."""
        super().reset_parameters(std, generator)
        std = self.config.initializer_range if std is None else std
        for module in self.modules():
            if isinstance(module, (RowParallelLinear, VocabParallelEmbedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        return self

    @classmethod
    def _build(cls, config, state, tp, dtype, device, causal, attention_backend):
        model_dtype = dtype if dtype is not None else state["embed_tokens.weight"].dtype
        if model_dtype not in MODEL_DTYPES:
            raise TypeError(
                f"tensor parallel: dtype {model_dtype} is not a model dtype the ops take (float16, "
                "bfloat16, float32); pass dtype="
            )
        model = cls(
            config, tp_group=tp, dtype=model_dtype, causal=causal, attention_backend=attention_backend
        )
        state = {n: t.to(device=device, dtype=model_dtype) for n, t in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.fuse_projections().eval()

    # ------------------------------------------------------------------ the LM head
    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., d]`` -> this rank's logits ``[..., V_r]`` (vocabulary rows
        ``[vocab_start, vocab_stop)``), model dtype."""
        return F.linear(hidden, self.lm_head_weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits ``[..., V]`` (every rank's shard, all-gathered): ``N x V`` values cross the
        group, so the fast paths use :meth:`unmask_step` / :meth:`next_tokens` instead."""
        local = self.local_logits(hidden)
        if self.tp.world_size == 1:
            return local
        V, chunk = self.full_config.vocab_size, vocab_chunk(self.full_config.vocab_size, self.tp.world_size)
        padded = F.pad(local, (0, chunk - local.shape[-1]))
        parts = self.tp.all_gather(padded)  # [N_ranks, ..., chunk]
        return torch.cat(list(parts.unbind(0)), dim=-1)[..., :V]

    def next_tokens(
        self,
        hidden: torch.Tensor,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``sample_tokens(self.logits(hidden), ...)`` for ``hidden [N, d]``: the same tokens on
        every rank. At temperature 0 without gathering logits (each rank's max and first argmax,
        one all-gather of ``[N, 2]``, the first maximum in vocabulary order wins, as
        ``torch.argmax``); sampled via the gathered logits (the exponential race over the whole
        vocabulary is drawn from ``generator`` exactly as on one device; rank 0's draw is used
        on every rank)."""
        if temperature:
            tokens = sample_tokens(self.logits(hidden), temperature, top_k, top_p, generator)
            # Rank 0's draw everywhere (N int64): ranks whose generators were seeded differently
            # (ARExecutor.generate(seed=None) seeds each afresh) still emit the same tokens.
            return self.tp.all_gather(tokens)[0]
        from .unmask import merge_argmax

        local = self.local_logits(hidden).float()
        m, arg = local.max(dim=-1)
        part = torch.stack([m.double(), (arg + self.vocab_start).double()], dim=-1)
        return merge_argmax(self.tp.all_gather(part))

    def unmask_step(self, x: torch.Tensor, **kwargs):
        """:func:`hybridkernels.ops.unmask_step` (same arguments; ``lm_head`` must be this rank's
        :attr:`lm_head_weight` or omitted) with the vocabulary split across the ranks:
        :func:`hybridkernels.distributed.unmask.vocab_parallel_unmask_step`."""
        from .unmask import vocab_parallel_unmask_step

        lm_head = kwargs.pop("lm_head", None)
        if lm_head is not None and lm_head is not self.lm_head_weight:
            raise ValueError(
                "TensorParallelTransformer.unmask_step: lm_head must be this rank's lm_head_weight "
                "(the vocabulary shard) or omitted"
            )
        return vocab_parallel_unmask_step(
            x,
            lm_head_shard=self.lm_head_weight,
            vocab_start=self.vocab_start,
            vocab_size=self.full_config.vocab_size,
            group=self.tp,
            **kwargs,
        )
