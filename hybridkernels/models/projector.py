"""``LatentProjector``: the planner's final hidden states -> prefix embeddings of the executor.

Latent mode ("Planner and Executor", arXiv 2510.15244) hands the executor the planner's thoughts
as vectors instead of text: the hidden states of the planner's generated positions ``[B, P,
d_planner]`` go through a small MLP into the executor's embedding space ``[B, P', d_executor]``
and are placed before the executor's prompt (``ARExecutor.generate(prefix_embeds=...)``).

Pipeline of one call: optional pooling of the ``P`` plan positions to ``P' = ceil(P / stride)``
(mean over windows of ``stride`` positions, or every ``stride``-th position), then the MLP
(default ``LayerNorm -> Linear -> GELU -> Linear``), then, when ``target_norm`` is set, every
output vector rescaled to L2 norm ``target_norm`` (the executor's mean token-embedding norm, see
:meth:`LatentProjector.for_models`), so the prefix looks like token embeddings to the executor.

Saved as ``config.json`` + ``model.safetensors`` (:meth:`save_pretrained` /
:meth:`from_pretrained`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from ..validation import check_choice, check_number, check_positive_int

WHERE = "ProjectorConfig"
POOLING = ("none", "mean", "stride")
ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU, "tanh": nn.Tanh}
MODEL_TYPE = "hybridkernels_latent_projector"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# Far above any real projector; beyond them building one would hang or exhaust memory.
_MAX_SIZES = {
    "planner_dim": 2**17,
    "executor_dim": 2**17,
    "hidden_dim": 2**18,
    "num_layers": 256,
    "pool_stride": 2**24,
}


@dataclasses.dataclass
class ProjectorConfig:
    """Shape of a :class:`LatentProjector`.

    ``planner_dim`` / ``executor_dim``: hidden sizes of the two models. ``hidden_dim``: width of
    the MLP's inner layers (default ``max(planner_dim, executor_dim)``). ``num_layers``: linear
    layers (>= 1; 1 = a single linear map). ``activation``: one of ``gelu``, ``silu``, ``relu``,
    ``tanh``. ``input_norm``: a LayerNorm over the planner's states first. ``pool``: ``none``,
    ``mean`` or ``stride`` over windows of ``pool_stride`` plan positions. ``target_norm``: L2
    norm of every output vector (None: no rescaling).
    """

    planner_dim: int
    executor_dim: int
    hidden_dim: int | None = None
    num_layers: int = 2
    activation: str = "gelu"
    input_norm: bool = True
    pool: str = "none"
    pool_stride: int = 1
    target_norm: float | None = None

    def __post_init__(self):
        for name in ("planner_dim", "executor_dim", "num_layers", "pool_stride"):
            check_positive_int(WHERE, name, getattr(self, name))
        if self.hidden_dim is None:
            self.hidden_dim = max(self.planner_dim, self.executor_dim)
        check_positive_int(WHERE, "hidden_dim", self.hidden_dim)
        for name, high in _MAX_SIZES.items():
            if getattr(self, name) > high:
                raise ValueError(
                    f"ProjectorConfig: {name} = {getattr(self, name)} exceeds {high} "
                    "(a corrupt or hostile config?)"
                )
        check_choice(WHERE, "activation", self.activation, tuple(ACTIVATIONS))
        check_choice(WHERE, "pool", self.pool, POOLING)
        if self.pool == "none" and self.pool_stride != 1:
            raise ValueError("ProjectorConfig: pool_stride > 1 needs pool='mean' or pool='stride'")
        if self.target_norm is not None:
            self.target_norm = check_number(WHERE, "target_norm", self.target_norm)
            if self.target_norm <= 0:
                raise ValueError(f"ProjectorConfig: target_norm must be > 0, got {self.target_norm}")

    def num_prefix(self, plan_len: int) -> int:
        """Prefix vectors out of ``plan_len`` plan positions: ``ceil(plan_len / pool_stride)``."""
        return -(-plan_len // self.pool_stride)

    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> ProjectorConfig:
        if d.get("model_type") != MODEL_TYPE:
            raise ValueError(
                f"ProjectorConfig.from_dict: model_type must be {MODEL_TYPE!r}, got {d.get('model_type')!r}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields - {"model_type"})
        if unknown:
            raise ValueError(f"ProjectorConfig.from_dict: unknown keys {unknown}")
        return cls(**{k: v for k, v in d.items() if k in fields})


def pool_positions(hidden: torch.Tensor, pool: str, stride: int) -> torch.Tensor:
    """``[B, P, d]`` -> ``[B, ceil(P / stride), d]``: ``mean`` averages each window of ``stride``
    positions (the last window may be shorter), ``stride`` keeps positions ``0, stride, ...``."""
    if pool == "none" or stride == 1:
        return hidden
    if pool == "stride":
        return hidden[:, ::stride]
    B, P, d = hidden.shape
    windows = -(-P // stride)
    padded = hidden.new_zeros(B, windows * stride, d)
    padded[:, :P] = hidden
    counts = torch.full((windows,), stride, dtype=hidden.dtype, device=hidden.device)
    counts[-1] = P - (windows - 1) * stride
    return padded.view(B, windows, stride, d).sum(2) / counts[:, None]


class LatentProjector(nn.Module):
    """Planner hidden states ``[B, P, planner_dim]`` -> executor prefix ``[B, P', executor_dim]``.

    Build with a :class:`ProjectorConfig` (or keyword arguments for one), or with
    :meth:`for_models` from the two models (dims and target norm read from them). Parameters are
    float32 by default; :meth:`forward` runs in the parameters' dtype and returns that dtype
    (cast to the executor's dtype with ``dtype=``).
    """

    def __init__(self, config: ProjectorConfig | None = None, *, device=None, dtype=None, **kwargs):
        super().__init__()
        if config is None:
            config = ProjectorConfig(**kwargs)
        elif kwargs:
            raise TypeError("LatentProjector: give a ProjectorConfig or keyword arguments, not both")
        if not isinstance(config, ProjectorConfig):
            raise TypeError(f"LatentProjector: config must be a ProjectorConfig, got {type(config).__name__}")
        self.config = config
        kw = dict(device=device, dtype=dtype)
        self.norm = nn.LayerNorm(config.planner_dim, **kw) if config.input_norm else None
        dims = [config.planner_dim] + [config.hidden_dim] * (config.num_layers - 1) + [config.executor_dim]
        layers: list[nn.Module] = []
        for i in range(config.num_layers):
            if i:
                layers.append(ACTIVATIONS[config.activation]())
            layers.append(nn.Linear(dims[i], dims[i + 1], **kw))
        self.mlp = nn.Sequential(*layers)

    @classmethod
    def for_models(cls, planner, executor, *, device=None, dtype=None, rescale: bool = True, **kwargs):
        """A projector sized for ``planner`` and ``executor`` (a ``DiffusionPlanner`` /
        ``ARExecutor`` or their :class:`~hybridkernels.models.Transformer`), on the executor's
        device. ``rescale``: set ``target_norm`` to the executor's mean token-embedding norm.
        Other keyword arguments go to :class:`ProjectorConfig`."""
        p_model, e_model = model_of(planner), model_of(executor)
        if rescale and "target_norm" not in kwargs:
            kwargs["target_norm"] = embedding_norm(e_model)
        config = ProjectorConfig(
            planner_dim=p_model.config.hidden_size, executor_dim=e_model.config.hidden_size, **kwargs
        )
        return cls(config, device=device if device is not None else e_model.device, dtype=dtype)

    @property
    def device(self) -> torch.device:
        return self.mlp[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mlp[0].weight.dtype

    def num_prefix(self, plan_len: int) -> int:
        return self.config.num_prefix(plan_len)

    def forward(self, hidden: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``hidden [B, P, planner_dim]`` (any float dtype, any device: moved to the projector's)
        -> ``[B, ceil(P / pool_stride), executor_dim]`` in ``dtype`` (default: the projector's)."""
        c = self.config
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise ValueError(f"LatentProjector: hidden must be a [B, P, planner_dim] tensor, got {got}")
        if hidden.shape[-1] != c.planner_dim:
            raise ValueError(
                f"LatentProjector: hidden has width {hidden.shape[-1]}, the projector expects the "
                f"planner's hidden size planner_dim = {c.planner_dim}"
            )
        if not hidden.dtype.is_floating_point:
            raise TypeError(f"LatentProjector: hidden must be a float tensor, got {hidden.dtype}")
        if hidden.shape[0] == 0 or hidden.shape[1] == 0:
            raise ValueError(f"LatentProjector: empty hidden states (shape {tuple(hidden.shape)})")
        x = hidden.to(self.device, self.dtype)
        x = pool_positions(x, c.pool, c.pool_stride)
        if self.norm is not None:
            x = self.norm(x)
        x = self.mlp(x)
        if c.target_norm is not None:
            x = x * (c.target_norm / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(x.dtype)
        return x if dtype is None else x.to(dtype)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into directory ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2))
        state = {n: t.detach().to("cpu").contiguous() for n, t in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device=None, dtype=None) -> LatentProjector:
        """Load a directory written by :meth:`save_pretrained` (``dtype`` default: as saved)."""
        from safetensors.torch import load_file

        path = Path(path)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / name).is_file():
                raise ValueError(f"LatentProjector.from_pretrained: {path} has no {name}")
        config = ProjectorConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
        state = load_file(str(path / WEIGHTS_NAME))
        model = cls(config, device="meta")
        expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
        got = {n: tuple(t.shape) for n, t in state.items()}
        if expected != got:
            raise ValueError(
                f"LatentProjector.from_pretrained: {path / WEIGHTS_NAME} does not match its config: "
                f"missing {sorted(set(expected) - set(got))}, unknown {sorted(set(got) - set(expected))}, "
                f"wrong shapes {[n for n in expected if n in got and expected[n] != got[n]]}"
            )
        if dtype is None:
            dtype = next(iter(state.values())).dtype
        state = {n: t.to(device=device or "cpu", dtype=dtype) for n, t in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model


def model_of(obj):
    """The :class:`~hybridkernels.models.Transformer` inside a planner / executor (or itself)."""
    from .transformer import Transformer

    if isinstance(obj, Transformer):
        return obj
    model = getattr(obj, "model", None)
    if isinstance(model, Transformer):
        return model
    raise TypeError(
        f"expected a DiffusionPlanner, an ARExecutor or a hybridkernels Transformer, got {type(obj).__name__}"
    )


@torch.no_grad()
def embedding_norm(model) -> float:
    """Mean L2 norm of the token embeddings of a :class:`~hybridkernels.models.Transformer`."""
    return float(model.embed_tokens.weight.float().norm(dim=-1).mean())


def check_projector_fits(where: str, projector: LatentProjector, planner, executor) -> None:
    """``ValueError`` naming both widths when ``projector`` does not map ``planner``'s hidden size to
    ``executor``'s."""
    if not isinstance(projector, LatentProjector):
        raise TypeError(f"{where}: projector must be a LatentProjector, got {type(projector).__name__}")
    d_p, d_e = model_of(planner).config.hidden_size, model_of(executor).config.hidden_size
    c = projector.config
    if c.planner_dim != d_p:
        raise ValueError(
            f"{where}: projector.config.planner_dim = {c.planner_dim} does not match the planner's "
            f"hidden_size = {d_p}"
        )
    if c.executor_dim != d_e:
        raise ValueError(
            f"{where}: projector.config.executor_dim = {c.executor_dim} does not match the executor's "
            f"hidden_size = {d_e}"
        )
