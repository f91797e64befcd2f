"""The hyperparameters of tuneonce's optimizers, defined once: default, bounds or choices, description, and whether a
change rebuilds Muon_adv's bucketing plan.

The optimizers take their keywords and defaults from these dataclasses, the config schema (modules/config/schema.py)
takes its optimizer fields' defaults, bounds and descriptions (the SCHEMA.md text) from them, and the factory passes
exactly their fields. No torch here: the config imports this module, and a bad config must fail before torch loads.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

ORTHOGONALIZERS = ("newton_schulz", "polar_express", "exact")
ORTHO_ROUTES = ("auto", "iterative", "gram")
LORA_SPECTRAL_TARGETS = ("factor", "product")
LORA_A_OPTIMIZERS = ("muon", "adam", "signsgd")
STATE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Spec:
    """One hyperparameter: what the config shows and checks, and whether Muon_adv must re-plan when it changes."""

    default: Any
    description: str
    plan: bool = True  # False: read at every step (the learning rates), so a change needs no new plan
    choices: tuple[str, ...] = ()
    bounds: dict[str, float] = field(default_factory=dict)  # pydantic's ge / gt / le / lt


def _spec(default: Any, description: str, *, plan: bool = True, choices: tuple[str, ...] = (), **bounds) -> Spec:
    return Spec(default, description, plan, choices, bounds)


# The user-facing descriptions are the config's (SCHEMA.md); where a key exists for several optimizer types, the
# text says which.
SPECS: dict[str, Spec] = {
    "lr": _spec(1e-3, "Peak learning rate (Muon family: the transferable 1e-3; prodigy: 1.0).", plan=False, ge=0),
    "beta1": _spec(0.95, "Momentum coefficient.", ge=0, lt=1),
    "nesterov": _spec(True, "Nesterov momentum (muon_adv, adamuon_adv, torch_muon)."),
    "weight_decay": _spec(
        0.1,
        "Decoupled weight decay, applied with the schedule factor lr_t/lr (not multiplied by lr); "
        "divided by fan_in when width_scaled_weight_decay.",
        ge=0,
    ),
    "ns_steps": _spec(5, "Orthogonalization iterations (Newton-Schulz steps).", ge=1, le=50),
    "ns_eps": _spec(1e-7, "Base damping of the Frobenius normalization; used when depth_scaled_eps is off.", ge=0),
    "orthogonalizer": _spec(
        "newton_schulz",
        "How updates are orthogonalized: newton_schulz (quintic, coefficients 3.4445, -4.7750, 2.0315), "
        "polar_express (per-step coefficients, converges faster) or exact (SVD polar factor U V^T).",
        choices=ORTHOGONALIZERS,
    ),
    "ortho_route": _spec(
        "auto",
        "iterative: matrix products on the whole matrix; gram: the same map from one small r x r "
        "eigendecomposition (fast for low-rank factors); auto picks per shape.",
        choices=ORTHO_ROUTES,
    ),
    "spectral_scaling": _spec(
        True, "Scale each update to spectral norm lr*sqrt(fan_out/fan_in) (spectral/muP step)."
    ),
    "lora_spectral_target": _spec(
        "factor", "Spectral target per LoRA factor's own shape, or for the product B*A's shape.",
        choices=LORA_SPECTRAL_TARGETS,
    ),
    "depth_scaled_eps": _spec(
        True,
        "Damping from depth L and width: ns_eps = sqrt(fan_in/fan_out)/L, AdaMuon eps = 1/(L*sqrt(fan_in*fan_out)).",
    ),
    "width_scaled_weight_decay": _spec(True, "Weight decay divided by fan_in (1/width)."),
    "lora_b_orthogonalize": _spec(True, "Orthogonalize LoRA B (up) factors with Muon."),
    "lora_a_optimizer": _spec(
        "muon", "How LoRA A (down) factors are trained: muon | adam (auxiliary Adam) | signsgd.",
        choices=LORA_A_OPTIMIZERS,
    ),
    "state_dtype": _spec("float32", "dtype of optimizer state.", choices=STATE_DTYPES),
    "adam_lr": _spec(1e-4, "LR of the auxiliary Adam (biases, norms, embeddings).", plan=False, ge=0),
    "adam_betas": _spec((0.9, 0.999), "Betas of the auxiliary Adam."),  # each in [0, 1): the schema's Beta type
    "adam_eps": _spec(1e-8, "eps of the auxiliary Adam.", gt=0),
    "adam_weight_decay": _spec(0.0, "Weight decay of the auxiliary Adam.", ge=0),
    "beta2": _spec(0.95, "AdaMuon second-moment coefficient (adamuon_adv).", ge=0, lt=1),
    "eps": _spec(1e-8, "AdaMuon second-moment eps (depth-scaled when depth_scaled_eps; adamuon_adv).", gt=0),
    "rebalance_every": _spec(0, "LoRA-Muon gauge rebalancing every N steps (0 = never; lora_muon).", ge=0),
    "rebalance_power": _spec(1.0, "LoRA-Muon rebalancing exponent alpha (lora_muon).", gt=0),
}


def _f(name: str) -> Any:
    """A dataclass field with the default of SPECS[name] (the spec itself rides along as metadata)."""
    return field(default=SPECS[name].default, metadata={"spec": SPECS[name]})


class _HParams:
    """Shared helpers of the hyperparameter dataclasses."""

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The constructor keywords, in field order."""
        return tuple(f.name for f in fields(cls))  # type: ignore[arg-type]

    @classmethod
    def plan_keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.metadata["spec"].plan)  # type: ignore[arg-type]

    @classmethod
    def build(cls, owner: str, base: _HParams | None = None, **overrides: Any):
        """``base`` (or the defaults) with ``overrides``; an unknown keyword is a TypeError naming it and ``owner``."""
        unknown = sorted(set(overrides) - set(cls.keys()))
        if unknown:
            raise TypeError(f"{owner} got unexpected keyword arguments {unknown}")
        return replace(base, **overrides) if base is not None else cls(**overrides)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)  # type: ignore[call-overload]
        out["adam_betas"] = tuple(out["adam_betas"])  # YAML and JSON give lists
        return out


@dataclass(frozen=True)
class MuonHParams(_HParams):
    """Muon_adv's keywords (see its docstring for what each one does)."""

    lr: float = _f("lr")
    beta1: float = _f("beta1")
    nesterov: bool = _f("nesterov")
    weight_decay: float = _f("weight_decay")
    ns_steps: int = _f("ns_steps")
    ns_eps: float = _f("ns_eps")
    orthogonalizer: str = _f("orthogonalizer")
    ortho_route: str = _f("ortho_route")
    spectral_scaling: bool = _f("spectral_scaling")
    lora_spectral_target: str = _f("lora_spectral_target")
    depth_scaled_eps: bool = _f("depth_scaled_eps")
    width_scaled_weight_decay: bool = _f("width_scaled_weight_decay")
    lora_b_orthogonalize: bool = _f("lora_b_orthogonalize")
    lora_a_optimizer: str = _f("lora_a_optimizer")
    state_dtype: str = _f("state_dtype")
    adam_lr: float = _f("adam_lr")
    adam_betas: tuple[float, float] = _f("adam_betas")
    adam_eps: float = _f("adam_eps")
    adam_weight_decay: float = _f("adam_weight_decay")


@dataclass(frozen=True)
class AdaMuonHParams(MuonHParams):
    """AdaMuon_adv's keywords: Muon_adv's plus the second moment's."""

    beta2: float = _f("beta2")
    eps: float = _f("eps")


@dataclass(frozen=True)
class LoRAMuonHParams(_HParams):
    """LoRAMuon's keywords."""

    lr: float = _f("lr")
    beta1: float = _f("beta1")
    weight_decay: float = _f("weight_decay")
    spectral_scaling: bool = _f("spectral_scaling")
    width_scaled_weight_decay: bool = _f("width_scaled_weight_decay")
    rebalance_every: int = _f("rebalance_every")
    rebalance_power: float = _f("rebalance_power")
    state_dtype: str = _f("state_dtype")
    adam_lr: float = _f("adam_lr")
    adam_betas: tuple[float, float] = _f("adam_betas")
    adam_eps: float = _f("adam_eps")
    adam_weight_decay: float = _f("adam_weight_decay")


# optimizer.type -> its hyperparameters (the other types take torch's / prodigyopt's keywords; see factory.py)
HPARAMS: dict[str, type[_HParams]] = {
    "muon_adv": MuonHParams,
    "adamuon_adv": AdaMuonHParams,
    "lora_muon": LoRAMuonHParams,
}
