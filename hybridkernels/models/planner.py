"""``DiffusionPlanner``: LLaDA-style masked-diffusion generation on the fast ops.

The algorithm is LLaDA's (:func:`hybridkernels.reference.llada_generate`, the spec): the generation
starts fully masked and is denoised window by window; each step runs the model, proposes a token for
every masked position of the window and commits some of them. Which window and how many tokens a
step commits is the :class:`~hybridkernels.schedules.Schedule`'s business (built from
:class:`PlannerOptions`, or given); how a step is computed is this module's: the LM head fused into
:func:`hybridkernels.ops.unmask_step` on the window's rows (no ``[B, L, V]`` logits), guidance on
hidden states, Fast-dLLM's prefix / dual K/V cache, and CUDA-graph steps (see :meth:`_step`).
At temperature 0 without a cache the tokens equal ``llada_generate``'s.

The Dream family (a Dream checkpoint, ``family="dream"``) runs Dream's sampler on the same machinery:
its schedules (:class:`~hybridkernels.schedules.DreamSchedule`, Fast-dLLM's
:class:`~hybridkernels.schedules.DreamBlockSchedule`) and its step (:mod:`.dream`: windows scored by
the hidden rows shifted by one). At temperature 0 without a cache its tokens equal
``reference.dream_generate``'s, with the block options ``reference.dream_block_generate``'s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import ops
from ..common import rank_and_commit
from ..ops import skip_value_checks
from ..validation import check_attention_mask, check_token_ids
from . import checkpoint, cpu_forward
from .cpu_forward import CPUForward
from .cuda_graphs import StepGraphs
from .diffusion_cache import DiffusionKVCache
from .dream import DreamStepKey, dream_step, dream_step_key
from .one_at_a_time import OneCallAtATime, one_at_a_time
from .planner_options import FAMILIES, WHERE, PlannerOptions
from .transformer import Transformer, default_position_ids


@dataclass
class PlannerStats:
    """What a run did.

    forward_passes: model calls (a CFG step is one call on ``2B`` rows; refreshes and the final
    pass of ``return_hidden`` included). steps: denoising steps. committed: int64 ``[steps, B]``
    tokens committed per step and sequence. refreshes: full forwards that filled the cache.
    skipped_blocks: windows not computed (``eos_early_stop``). graph_replays: steps replayed from a
    CUDA graph. seconds: wall time of the call.
    """

    forward_passes: int
    steps: int
    committed: torch.Tensor
    refreshes: int
    skipped_blocks: int
    graph_replays: int
    seconds: float

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens committed per step and sequence."""
        return float(self.committed.float().mean()) if self.steps else 0.0


class PlannerOutput(NamedTuple):
    """tokens: int64 ``[B, Lp + gen_length]`` (prompt, left-padded as given, then the generation).
    hidden: ``[B, gen_length, d]`` final-layer hidden states (after the final norm, model dtype) of
    the generated positions from one forward over the finished sequence, or None.
    """

    tokens: torch.Tensor
    hidden: torch.Tensor | None
    stats: PlannerStats
    prompt_length: int

    @property
    def generated(self) -> torch.Tensor:
        """``[B, gen_length]``: the generated tokens."""
        return self.tokens[:, self.prompt_length :]


class PlannerBlock(NamedTuple):
    """Yielded by :meth:`DiffusionPlanner.generate_stream` when window ``index`` (``[start, stop)``)
    is done. ``tokens`` is the planner's live ``[B, Lp + gen_length]`` buffer: clone what you keep."""

    index: int
    start: int
    stop: int
    tokens: torch.Tensor


@dataclass(frozen=True)
class _StepKey:
    """Everything a captured step bakes in besides the workspace's tensors."""

    temperature: float
    cfg_scale: float
    remasking: str
    threshold: float | None
    banned: tuple[int, ...]
    deferred: tuple[int, ...]
    dream: DreamStepKey | None = None


class _Workspace:
    """Static tensors of one (batch, prompt length, generation length, mask, CFG, cache) shape:
    the tokens, positions, K/V buffers and the steps' inputs; the CUDA graphs read them."""

    def __init__(self, planner: DiffusionPlanner, B, Lp, G, has_mask, cfg, cache, device):
        model = planner.model
        cfg_rows = 2 * B if cfg else B
        L = Lp + G
        self.key = (B, Lp, G, has_mask, cfg, cache, device)
        self.prompt_length, self.length = Lp, L
        self.x = torch.empty(B, L, dtype=torch.long, device=device)
        self.valid = torch.ones(cfg_rows, L, dtype=torch.bool, device=device) if has_mask else None
        self.pos = torch.empty(cfg_rows, L, dtype=torch.long, device=device)
        self.all_slots = torch.arange(L, device=device)
        self.slots: dict[tuple[int, str], torch.Tensor] = {}
        self.p_transfer: torch.Tensor | None = None  # Dream's origin rule
        self.num_transfer = torch.zeros(B, dtype=torch.long, device=device)
        self.no_transfer = torch.zeros(B, dtype=torch.long, device=device)
        self.count = torch.zeros(B, dtype=torch.long, device=device)
        self.deferred_ids: dict[tuple[int, ...], torch.Tensor] = {}
        c = model.config
        self.kv = None
        if cache is not None:
            self.kv = DiffusionKVCache(
                num_layers=c.num_layers,
                batch=cfg_rows,
                length=L,
                num_kv_heads=c.num_kv_heads,
                head_dim=c.head_dim,
                dtype=model.dtype,
                device=device,
                key_padding_mask=self.valid,
                attention_backend=planner.backend,
            )
        self.graphs = StepGraphs(device) if device.type == "cuda" else None
        self.cpu_forwards: dict[tuple[int, int], CPUForward] = {}
        self.use_cpu_forward = False  # set per generation (_Run): the cached forwards on CPUForward

    def forward(self, model: Transformer, ids: torch.Tensor, positions: torch.Tensor, **fwd) -> torch.Tensor:
        """The hidden states ``[rows, T, d]`` of ``ids`` at ``positions`` against the K/V cache
        (its queries set): :class:`CPUForward` when ``use_cpu_forward``, else the model's forward."""
        if not self.use_cpu_forward:
            return model(ids, position_ids=positions, kv_cache=self.kv, **fwd).hidden
        key = tuple(ids.shape)
        f = self.cpu_forwards.get(key)
        if f is None:
            f = self.cpu_forwards[key] = CPUForward(
                model, batch=key[0], length=key[1], table_rows=self.length
            )
        return f(ids, positions, self.kv)

    def load(self, prompt: torch.Tensor, attention_mask: torch.Tensor | None, mask_id: int) -> None:
        B, Lp = prompt.shape
        self.x[:, :Lp] = prompt
        self.x[:, Lp:] = mask_id
        if self.valid is not None:
            rows = self.valid.shape[0]
            self.valid[:, :Lp] = (attention_mask != 0).repeat(rows // B, 1)
        self.pos.copy_(default_position_ids(self.valid, self.pos.shape[0], self.length, self.x.device))

    def window(self, start: int, stop: int, tag: str = "") -> torch.Tensor:
        """The static slot tensor ``[stop - start]`` of a window (one per length and ``tag``), set to it."""
        slots = self.slots.get((stop - start, tag))
        if slots is None:
            slots = self.slots[(stop - start, tag)] = torch.empty(
                stop - start, dtype=torch.long, device=self.x.device
            )
        slots.copy_(self.all_slots[start:stop])
        return slots


class DiffusionPlanner:
    """Masked-diffusion generation (LLaDA, Dream) with a :class:`~hybridkernels.models.Transformer`.

    Args:
        model: the planner's transformer (run bidirectionally whatever its ``causal`` default).
        family: ``"llada"`` (LLaDA's sampler; any Llama-family model) or ``"dream"`` (Dream's:
            shifted logits, its schedule and ``alg`` options); None: ``"dream"`` for a Dream
            config (``model_type: "Dream"``), else ``"llada"``.
        mask_id, eos_id, eot_id: special tokens; default from ``model.config``
            (``mask_token_id``, ``eos_token_ids[0]``, ``eot_token_id``).
        backend: backend of every op the planner runs, attention and unmask (``"triton"``,
            ``"reference"``, None = the model's / auto).

    The planner keeps the static buffers (K/V cache, tokens) and CUDA graphs of its last
    generation shape for the next call; :meth:`release` frees them (call it too after replacing
    the model's parameter tensors: the graphs read the old ones). One generation at a time per
    planner: a second concurrent one (another thread) raises ``RuntimeError``.
    """

    def __init__(
        self,
        model: Transformer,
        *,
        mask_id: int | None = None,
        eos_id: int | None = None,
        eot_id: int | None = None,
        backend: str | None = None,
        family: str | None = None,
    ):
        if not isinstance(model, Transformer):
            raise TypeError(f"DiffusionPlanner: model must be a Transformer, got {type(model).__name__}")
        c = model.config
        self.family = _family_of(c.family) if family is None else family
        if self.family not in FAMILIES:
            raise ValueError(f"DiffusionPlanner: family must be one of {FAMILIES} or None, got {family!r}")
        V = c.vocab_size
        self.model = model
        defaults = {
            "mask_id": c.mask_token_id,
            "eos_id": c.eos_token_ids[0] if c.eos_token_ids else None,
            "eot_id": c.eot_token_id,
        }
        for name, value in (("mask_id", mask_id), ("eos_id", eos_id), ("eot_id", eot_id)):
            if value is None:  # from the config; LLaDA's default ids do not fit a tiny vocabulary
                value = defaults[name] if defaults[name] is not None and 0 <= defaults[name] < V else None
            elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < V:
                raise ValueError(f"DiffusionPlanner: {name} must be a token id in [0, {V}), got {value!r}")
            setattr(self, name, value)
        if self.mask_id is None:
            raise ValueError(f"DiffusionPlanner: the config has no mask_token_id in [0, {V}); pass mask_id")
        self.backend = backend
        self._workspace: _Workspace | None = None
        self._busy = OneCallAtATime("DiffusionPlanner")

    @classmethod
    def from_pretrained(
        cls,
        path,
        *,
        mask_id: int | None = None,
        eos_id: int | None = None,
        eot_id: int | None = None,
        backend: str | None = None,
        family: str | None = None,
        **kwargs,
    ) -> DiffusionPlanner:
        """Load a LLaDA (or any Llama-family) or Dream checkpoint directory. ``mask_id``/``eos_id``/
        ``eot_id`` and ``backend`` as in the constructor; ``family`` (``"llada"``/``"dream"``) is
        what the directory must hold (``ValueError`` saying what it holds otherwise), None: what
        its ``config.json`` says; ``kwargs`` go to :meth:`Transformer.from_pretrained`
        (``dtype``, ``device``, ...)."""
        held = checkpoint.read_config(path, kwargs.get("config_overrides")).family
        if family is not None:
            if family not in FAMILIES:
                raise ValueError(f"{_LOAD}: family must be one of {FAMILIES} or None, got {family!r}")
            if _family_of(held) != family:
                what = {"dream": "a Dream checkpoint (model_type 'Dream')", "llada": "a LLaDA checkpoint"}
                raise ValueError(
                    f"{_LOAD}: {path} holds {what.get(held, f'a {held} checkpoint')}, "
                    f"not a {'Dream' if family == 'dream' else 'LLaDA-family'} one (family={family!r}); "
                    "pass family=None to load what it holds"
                )
        model = Transformer.from_pretrained(path, causal=False, attention_backend=backend, **kwargs)
        return cls(model, mask_id=mask_id, eos_id=eos_id, eot_id=eot_id, backend=backend, family=family)

    def release(self) -> None:
        """Free the cached buffers and CUDA graphs."""
        self._workspace = None

    # ------------------------------------------------------------------------------ public API
    @one_at_a_time
    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        options: PlannerOptions | None = None,
        *,
        return_hidden: bool = False,
        generator: torch.Generator | None = None,
        cuda_graph: bool | None = None,
        **overrides,
    ) -> PlannerOutput:
        """Generate ``options.gen_length`` tokens after each prompt.

        Args:
            prompt_ids: int ``[B, Lp]`` token ids on the model's device, left-padded; must not
                contain ``mask_id``.
            attention_mask: ``[B, Lp]`` bool or 0/1 (1 = real token, zeros first), or None.
            options: :class:`PlannerOptions` (default ``PlannerOptions()``); ``overrides`` are any
                of its fields, applied on top (``generate(ids, gen_length=64, cache="dual")``).
            return_hidden: also return the final hidden states of the generated positions.
            generator: randomness of ``temperature > 0`` and ``remasking="random"``.
            cuda_graph: capture the steps in CUDA graphs (default: on CUDA tensors, unless a
                ``generator`` drives random draws: those are replayed from torch's default one).

        Returns :class:`PlannerOutput` ``(tokens, hidden, stats, prompt_length)``.
        """
        started = time.perf_counter()
        run = _Run(self, prompt_ids, attention_mask, _options(options, overrides), generator, cuda_graph)
        for _ in run.blocks():
            pass
        return run.finish(started, return_hidden)

    def generate_stream(
        self,
        prompt_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        options: PlannerOptions | None = None,
        *,
        generator: torch.Generator | None = None,
        cuda_graph: bool | None = None,
        **overrides,
    ) -> Iterator[PlannerBlock]:
        """:meth:`generate` as a stream: yields a :class:`PlannerBlock` after each window, e.g. to
        hand finished blocks downstream early. Stopping the iteration stops the generation."""
        if overrides.get("return_hidden"):
            raise ValueError("DiffusionPlanner.generate_stream: return_hidden is only for generate()")
        with self._busy():
            with torch.no_grad():
                run = _Run(
                    self,
                    prompt_ids,
                    attention_mask,
                    _options(options, overrides),
                    generator,
                    cuda_graph,
                )
            blocks = run.blocks()
            while True:
                with torch.no_grad():
                    block = next(blocks, None)
                if block is None:
                    return
                yield block

    # ------------------------------------------------------------------------------ one step
    def _step(
        self, ws: _Workspace, key: _StepKey, full: bool, slots: torch.Tensor, queries: torch.Tensor, generator
    ):
        """One denoising step on the window ``slots``: forward, guidance, fused LM head + commit
        into ``ws.x``. Reads and writes only ``ws``'s tensors, so it can be captured and replayed
        (the window's position is a device tensor of slots: one graph serves every block).

        * No cache: a full forward over prompt + generation; the window's rows are kept.
        * ``cache="dual"`` (Fast-dLLM's dual cache): a ``full`` step (a window's first, or every
          ``cache_refresh``-th) fills one K/V buffer per layer over the whole sequence; the others
          run the window's tokens only and attend the buffer: prompt, finished blocks and masked
          suffix as of the refresh. ``cache="prefix"`` (Fast-dLLM's prefix cache): the cached
          steps run the window *and the whole masked suffix* (``queries``, the slots from the
          window's start to the end) against the buffer, so only the prefix is as of the refresh.
        * Guidance combines the final hidden states, ``h_u + (s + 1) (h_c - h_u)``, before the
          (linear) LM head: LLaDA's ``u + (s + 1) (c - u)`` on logits, up to rounding.
        * The Dream family's step is :func:`.dream.dream_step`.
        """
        if key.dream is not None:
            return dream_step(self, ws, key, full, slots, queries, generator)
        model, x, Lp = self.model, ws.x, ws.prompt_length
        ids = x
        if key.cfg_scale > 0:
            uncond = x.clone()
            uncond[:, :Lp] = self.mask_id
            ids = torch.cat([x, uncond])
        fwd = dict(causal=False, compute_logits=False, attention_backend=self.backend)
        if ws.kv is None:
            hidden = model(ids, ws.valid, position_ids=ws.pos, **fwd).hidden.index_select(1, slots)
        elif full:
            ws.kv.set_queries(ws.all_slots, ws.length)
            hidden = ws.forward(model, ids, ws.pos, **fwd).index_select(1, slots)
        else:
            ws.kv.set_queries(queries, ws.length)
            q_ids, q_pos = ids.index_select(1, queries), ws.pos.index_select(1, queries)
            hidden = ws.forward(model, q_ids, q_pos, **fwd)[:, : slots.numel()]
        if key.cfg_scale > 0:
            cond, uncond = hidden.float().chunk(2)
            hidden = (uncond + (key.cfg_scale + 1) * (cond - uncond)).to(model.dtype)

        window = x.index_select(1, slots)
        rule = (
            {"threshold": key.threshold} if key.threshold is not None else {"num_transfer": ws.num_transfer}
        )
        op_kw = dict(
            hidden=hidden,
            lm_head=model.lm_head_weight,
            mask_id=self.mask_id,
            temperature=key.temperature,
            banned_token_ids=key.banned,
            generator=generator,
            backend=self.backend,
        )
        # A tensor-parallel model (hybridkernels.distributed) splits the vocabulary across ranks.
        unmask = getattr(model, "unmask_step", ops.unmask_step)
        if key.remasking == "low_confidence":
            committed = unmask(window, deferred_token_ids=key.deferred, **rule, **op_kw).committed
        else:
            # The op proposes the candidates (committing nothing); the ranks are LLaDA's uniform
            # draw over the whole [B, L] sequence, from the same generator in the same order.
            tokens = unmask(window, num_transfer=ws.no_transfer, **op_kw).tokens
            draw = torch.rand(x.shape, generator=generator, device=x.device).index_select(1, slots)
            committable = window == self.mask_id
            blocked = ~committable
            if key.deferred:
                blocked |= torch.isin(tokens, ws.deferred_ids[key.deferred])
            score = draw.masked_fill(blocked, float("-inf"))
            committed = rank_and_commit(
                score, committable, num_transfer=rule.get("num_transfer"), threshold=key.threshold
            )
            window = torch.where(committed, tokens, window)
        x.index_copy_(1, slots, window)
        ws.count.copy_(committed.sum(dim=1))

    def _run_step(self, ws: _Workspace, key: _StepKey, full, slots, queries, generator, graphs: bool) -> bool:
        """Run one step eagerly, or through the workspace's CUDA graphs (:class:`StepGraphs`).
        Returns whether it replayed a graph."""
        if not graphs:
            self._step(ws, key, full, slots, queries, generator)
            return False
        # Only a cached (not full) step reads its query slots; keying the others on them would give
        # the prefix cache's refreshes one graph per block, each never replayed.
        gkey = (key, full, slots.numel(), queries.numel() if ws.kv is not None and not full else None)
        return ws.graphs.run(gkey, lambda: self._step(ws, key, full, slots, queries, generator))


class _Run:
    """One generation: checked arguments, the workspace, and the window loop over the schedule."""

    def __init__(self, planner, prompt_ids, attention_mask, options: PlannerOptions, generator, cuda_graph):
        self.planner = p = planner
        o = self.options = options
        o.check_family(p.family)
        _check_prompt(prompt_ids, attention_mask, p.model, p.mask_id)
        for option, ids in (
            ("logits_eos_inf", ("eos_id",)),
            ("eos_early_stop", ("eos_id",)),
            ("confidence_eos_eot_inf", ("eos_id", "eot_id")),
        ):
            missing = [name for name in ids if getattr(o, option) and getattr(p, name) is None]
            if missing:
                raise ValueError(
                    f"{WHERE}: {option} needs the planner's {missing[0]} (pass it to DiffusionPlanner)"
                )
        B, Lp = prompt_ids.shape
        self.schedule = o.make_schedule(Lp, p.family)
        self.dream = None
        if p.family == "dream":
            self.dream = dream_step_key(o, blocks=o.dream_blocks)

        device = p.model.device
        # Dream's origin and alg_temp steps size their draws on the host: no graph capture.
        host_sized = self.dream is not None and (self.dream.rule is None or self.dream.alg_temp is not None)
        if cuda_graph is None:
            cuda_graph = (
                device.type == "cuda" and not (o.randomness and generator is not None) and not host_sized
            )
        elif cuda_graph and host_sized:
            raise ValueError(
                f"{WHERE}: cuda_graph=True cannot capture Dream's alg='origin' or alg_temp steps"
            )
        elif cuda_graph and device.type != "cuda":
            raise ValueError(f"{WHERE}: cuda_graph=True needs the model on a CUDA device, it is on {device}")
        elif cuda_graph and o.randomness and generator is not None:
            raise ValueError(
                f"{WHERE}: cuda_graph=True replays random draws from torch's default generator; "
                "pass generator=None (seed with torch.manual_seed) or cuda_graph=False"
            )
        self.B, self.Lp = B, Lp
        self.banned = (p.eos_id,) if o.logits_eos_inf else ()
        self.deferred = tuple(sorted({p.eos_id, p.eot_id})) if o.confidence_eos_eot_inf else ()
        self.generator, self.use_graphs = generator, bool(cuda_graph)

        has_mask, cfg = attention_mask is not None, o.cfg_scale > 0
        ws_key = (B, Lp, o.gen_length, has_mask, cfg, o.cache, device)
        if p._workspace is None or p._workspace.key != ws_key:
            p._workspace = None  # free the old buffers before allocating new ones
            p._workspace = _Workspace(p, B, Lp, o.gen_length, has_mask, cfg, o.cache, device)
        self.ws = ws = p._workspace
        ws.load(prompt_ids, attention_mask, p.mask_id)
        # On the CPU with the automatic backends, the cached forwards skip torch's per-op dispatch.
        ws.use_cpu_forward = (
            ws.kv is not None and p.backend is None and cpu_forward.unsupported_reason(p.model) is None
        )
        if ws.use_cpu_forward:  # forget forwards built on weight tensors the model no longer has
            ws.cpu_forwards = {k: f for k, f in ws.cpu_forwards.items() if f.reads(p.model)}
        if self.deferred and self.deferred not in ws.deferred_ids:
            ws.deferred_ids[self.deferred] = torch.tensor(self.deferred, device=device)
        self.committed: list[torch.Tensor] = []
        self.forward_passes = self.refreshes = self.skipped = self.replays = 0

    def step_key(self, threshold: float | None) -> _StepKey:
        o = self.options
        return _StepKey(
            float(o.temperature),
            float(o.cfg_scale),
            o.remasking,
            threshold,
            self.banned,
            self.deferred,
            self.dream,
        )

    def blocks(self) -> Iterator[PlannerBlock]:
        ws, x, Lp, mask_id, o = self.ws, self.ws.x, self.Lp, self.planner.mask_id, self.options
        sched = self.schedule
        for stage in range(sched.num_stages):
            start, stop = sched.window(stage)
            first = start
            if start > Lp:
                first, all_done = self._between_windows(start)
                if all_done:
                    self.skipped = sched.num_stages - stage
                    return
            rows, slots, window_steps = None, None, 0
            # Steps that commit nothing are skipped, unless they would consume random draws.
            for plan in sched.stage_plans(x, mask_id, stage, first=first, skip_idle=not o.randomness):
                if (plan.start, plan.stop) != rows:
                    rows, slots = (plan.start, plan.stop), ws.window(plan.start, plan.stop)
                    # The prefix cache's cached steps also recompute the masked suffix.
                    if self.dream is not None:  # Dream's window is scored from the row before it
                        end = ws.length if o.cache == "prefix" else plan.stop
                        queries = ws.window(plan.start - 1, end, tag="queries")
                    else:
                        queries = ws.window(plan.start, ws.length) if o.cache == "prefix" else slots
                if plan.num_transfer is not None:
                    ws.num_transfer.copy_(plan.num_transfer)
                if plan.transfer_probability is not None:
                    ws.p_transfer = plan.transfer_probability
                full = (
                    o.cache is None
                    or window_steps == 0
                    or (o.cache_refresh is not None and window_steps % o.cache_refresh == 0)
                )
                with skip_value_checks():  # the counts are valid by construction: no host sync
                    replayed = self.planner._run_step(
                        ws,
                        self.step_key(plan.threshold),
                        full,
                        slots,
                        queries,
                        self.generator,
                        self.use_graphs,
                    )
                window_steps += 1
                self.replays += replayed
                self.refreshes += full and o.cache is not None
                self.committed.append(ws.count.clone())
            self.forward_passes += window_steps
            yield PlannerBlock(stage, start, stop, x)

    def _between_windows(self, start: int) -> tuple[int, bool]:
        """One host sync before a window: the first still-masked generated position (stale masks),
        and, with ``eos_early_stop``, EOS-fill the finished sequences and say whether all are."""
        x, Lp, mask_id = self.ws.x, self.Lp, self.planner.mask_id
        stale = (x[:, Lp:start] == mask_id).any(dim=0)
        stale_at = torch.where(stale.any(), stale.int().argmax() + Lp, start)
        if not self.options.eos_early_stop:
            return int(stale_at), False
        done = _ends_in_eos(x[:, Lp:start], self.planner.eos_id)
        x[:, start:].masked_fill_(done[:, None], self.planner.eos_id)
        first, all_done = torch.stack([stale_at, done.all().long()]).tolist()
        return first, bool(all_done)

    def finish(self, started: float, return_hidden: bool) -> PlannerOutput:
        ws = self.ws
        hidden = None
        if return_hidden:
            out = self.planner.model(
                ws.x,
                None if ws.valid is None else ws.valid[: self.B],
                position_ids=ws.pos[: self.B],
                causal=False,
                compute_logits=False,
                attention_backend=self.planner.backend,
            )
            hidden = out.hidden[:, self.Lp :]
            self.forward_passes += 1
        committed = (
            torch.stack(self.committed) if self.committed else torch.zeros(0, self.B, dtype=torch.long)
        ).cpu()
        tokens = ws.x.clone()
        if tokens.is_cuda:
            torch.cuda.synchronize(tokens.device)
        stats = PlannerStats(
            forward_passes=self.forward_passes,
            steps=len(self.committed),
            committed=committed,
            refreshes=self.refreshes,
            skipped_blocks=self.skipped,
            graph_replays=self.replays,
            seconds=time.perf_counter() - started,
        )
        return PlannerOutput(tokens, hidden, stats, self.Lp)


_LOAD = "DiffusionPlanner.from_pretrained"


def _family_of(config_family: str) -> str:
    """The planner family of a :class:`TransformerConfig` family: Dream's, or LLaDA's for the rest."""
    return "dream" if config_family == "dream" else "llada"


def _ends_in_eos(gen: torch.Tensor, eos_id: int) -> torch.Tensor:
    """bool ``[B]``: the row holds EOS and every position from its first EOS on is EOS."""
    is_eos = gen == eos_id
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), gen.shape[1])
    before = torch.arange(gen.shape[1], device=gen.device)[None, :] < first[:, None]
    return is_eos.any(dim=1) & (is_eos | before).all(dim=1)


def _check_prompt(prompt, attention_mask, model: Transformer, mask_id: int) -> None:
    check_token_ids(WHERE, "prompt_ids", prompt)
    if prompt.device != model.device:
        raise ValueError(f"{WHERE}: prompt_ids is on {prompt.device}, the model on {model.device}")
    V = model.config.vocab_size
    if bool(((prompt < 0) | (prompt >= V)).any()):
        raise ValueError(f"{WHERE}: prompt_ids must hold token ids in [0, {V})")
    if bool((prompt == mask_id).any()):
        row, col = (prompt == mask_id).nonzero()[0].tolist()
        raise ValueError(
            f"{WHERE}: prompt_ids[{row}, {col}] is the mask token {mask_id}; prompts (and their "
            "padding) must not contain mask_id"
        )
    if attention_mask is not None:
        check_attention_mask(
            WHERE,
            attention_mask,
            prompt.shape,
            prompt.device,
            like="prompt_ids",
            binary=True,
            left_padded=True,
        )


def _options(options: PlannerOptions | None, overrides: dict) -> PlannerOptions:
    if options is None:
        options = PlannerOptions()
    elif not isinstance(options, PlannerOptions):
        raise TypeError(f"{WHERE}: options must be a PlannerOptions, got {type(options).__name__}")
    return options.replace(**overrides) if overrides else options
