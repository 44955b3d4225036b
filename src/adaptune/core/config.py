"""AdapterConfig: what one task adapter looks like, as a small frozen dataclass.

Houlsby et al. 2019, §2.1 fixes the module (a bottleneck with an internal skip connection) and
where it goes (after the attention and the feed-forward output projections). The experiments vary
only a handful of things: the bottleneck size m, the initialisation scale, which layers carry
adapters, and whether layer norms are trained. Later work changes the placement: Pfeiffer et al.
2021 keep only the feed-forward adapter, He et al. 2022 run it in parallel to the sub-layer with a
scale. Pfeiffer et al. 2020 (AdapterHub's ``seq_bn``) also move the adapter's input: it reads the
sub-layer's output after the layer's own residual add and layer norm. Those are the fields below;
the named presets fill them in.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from dataclasses import dataclass
from typing import Any

from adaptune.errors import ConfigError

SLOTS = ("attn", "ffn")  # the two sub-layers of a Transformer layer that can carry an adapter
MODES = ("sequential", "parallel")
NONLINEARITIES = ("gelu", "relu", "tanh", "silu", "identity")


@dataclass(frozen=True)
class AdapterConfig:
    """One task adapter.

    Args:
        size: bottleneck dimension m (the paper uses 8-256; 64 is its usual choice).
        slots: sub-layers that get an adapter: ``"attn"`` (after the attention output projection)
            and/or ``"ffn"`` (after the feed-forward output projection).
        mode: ``"sequential"`` applies ``h + up(act(down(h)))`` to the sub-layer's output (Houlsby);
            ``"parallel"`` adds ``scale * up(act(down(x)))`` of the sub-layer's *input* x to its
            output (He et al. 2022).
        nonlinearity: activation inside the bottleneck (GELU in the released code).
        init_std: standard deviation of the truncated-normal init of both projections (truncated at
            2 std; biases zero). The paper's text uses 1e-2, the released code 1e-3; both keep the
            fresh adapter close to the identity.
        scale: multiplier on the adapter branch (1 for Houlsby, 4 for He et al.'s parallel adapter).
        zero_init_up: start the up-projection at exactly zero (He et al. 2022 for the parallel
            adapter), so the fresh adapter is exactly the identity; the down-projection keeps
            ``init_std`` so gradients reach the up-projection from the first step.
        norm_before: (sequential only) the adapter reads ``norm(h + x)`` -- the sub-layer's output h
            plus its input x through the layer's own (task-copied, if trained) layer norm -- and
            its result is added to h: ``h + a(norm(h + x))``, then the layer's add-and-norm runs as
            usual. Pfeiffer et al. 2020's placement (AdapterHub ``original_ln_before``), for
            post-norm families (BERT-like; ``ArchSpec.post_norm``): pre-norm ones (GPT-2, LLaMA)
            have no norm after the residual add, and are refused.
        layers: indices of the layers that carry adapters; ``None`` means every layer. Negative
            indices count from the top, as in Python.
        train_layer_norms: give the task its own copy of every layer norm and train it (the paper
            does). Off: the base model's layer norms are used, frozen.
        train_embedding_norm: with ``train_layer_norms``, also train a copy of the norm that sits
            before the first layer (BERT's ``embeddings.LayerNorm``), as the released code does.
            Off: that norm stays frozen, so backward stops at the first adapter and skips the
            first layer's attention block (about 2.6 % of an all-MiniLM-L6-v2 adapter step's
            FLOPs, and its saved activations). Models without such a norm are unaffected.
        train_head: give the task its own copy of the model's head (classifier) and train it.
        fuse: names of adapters on the same model to fuse (AdapterFusion, Pfeiffer et al. 2021;
            :mod:`adaptune.core.fusion`): this adapter then has no bottlenecks of its own but a
            fusion layer per sub-layer the fused adapters cover (``slots`` and ``layers`` must be
            theirs), and trains only that (with its head and copies); the fused adapters stay frozen.
        train_pooler: give the task its own copy of the model's pooler (BERT's dense + tanh on the
            first token, which its classifier reads) and train it as part of the head. The paper
            kept BERT's pooler frozen, pretrained on next-sentence prediction; checkpoints made for
            sentence embeddings (sentence-transformers) never trained theirs, and behind a frozen
            untrained pooler adapters learned nothing on imbalanced tasks (docs/quality.md). Adds
            d² + d parameters; models without a pooler are unaffected.
    """

    size: int = 64
    slots: tuple[str, ...] = SLOTS
    mode: str = "sequential"
    nonlinearity: str = "gelu"
    init_std: float = 1e-2
    scale: float = 1.0
    zero_init_up: bool = False
    norm_before: bool = False
    layers: tuple[int, ...] | None = None
    train_layer_norms: bool = True
    train_embedding_norm: bool = True
    train_head: bool = True
    train_pooler: bool = True
    fuse: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # JSON gives lists; keep tuples so the config stays hashable and frozen.
        object.__setattr__(self, "slots", tuple(self.slots))
        if isinstance(self.fuse, str) or not all(isinstance(n, str) for n in self.fuse):
            raise ConfigError(f"fuse must be a list of adapter names, got {self.fuse!r}")
        object.__setattr__(self, "fuse", tuple(self.fuse))
        if self.fuse and (len(set(self.fuse)) < 2 or len(set(self.fuse)) != len(self.fuse)):
            raise ConfigError(
                f"a fusion needs at least two different adapters, each named once; got {list(self.fuse)}"
            )
        if self.layers is not None:
            try:  # operator.index: ints only (no 1.5 silently cut to 1, no "2" from a hand-edited JSON)
                object.__setattr__(self, "layers", tuple(operator.index(i) for i in self.layers))
            except TypeError:
                raise ConfigError(
                    f"layers must be None or a list of integer layer indices, got {self.layers!r}"
                ) from None
        for flag in (
            "train_layer_norms",
            "train_embedding_norm",
            "train_head",
            "train_pooler",
            "zero_init_up",
            "norm_before",
        ):
            if not isinstance(getattr(self, flag), bool):  # the JSON string "false" would be truthy
                raise ConfigError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        for num in ("init_std", "scale"):
            if not isinstance(getattr(self, num), (int, float)) or isinstance(getattr(self, num), bool):
                raise ConfigError(f"{num} must be a number, got {getattr(self, num)!r}")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ConfigError(f"adapter size must be a positive integer, got {self.size!r}")
        if not self.slots or any(s not in SLOTS for s in self.slots) or len(set(self.slots)) != len(self.slots):
            raise ConfigError(f"slots must be a non-empty subset of {SLOTS}, got {self.slots!r}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.norm_before and self.mode != "sequential":
            raise ConfigError("norm_before is for sequential adapters; a parallel adapter reads the sub-layer's input")
        if self.nonlinearity not in NONLINEARITIES:
            raise ConfigError(f"nonlinearity must be one of {NONLINEARITIES}, got {self.nonlinearity!r}")
        if not (self.init_std >= 0 and self.init_std < float("inf")):
            raise ConfigError(f"init_std must be a finite number >= 0, got {self.init_std!r}")
        if not (abs(self.scale) < float("inf")):
            raise ConfigError(f"scale must be finite, got {self.scale!r}")
        if self.layers is not None and len(self.layers) == 0:
            raise ConfigError("layers is empty: pass None for every layer, or at least one index")

    # ---- presets --------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> AdapterConfig:
        """A named placement from the literature, optionally with fields changed.

        Example:
            >>> AdapterConfig.preset("houlsby", size=64).slots
            ('attn', 'ffn')
        """
        if name not in PRESETS:
            raise ConfigError(f"unknown adapter preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @property
    def reads(self) -> str:
        """What the bottleneck reads: ``"output"`` (the sub-layer's output h, Houlsby), ``"input"``
        (the sub-layer's input x, parallel) or ``"normed"`` (``norm(h + x)``, Pfeiffer)."""
        if self.mode == "parallel":
            return "input"
        return "normed" if self.norm_before else "output"

    def num_adapters(self, num_layers: int) -> int:
        """How many bottleneck modules this config puts on a model of ``num_layers`` layers."""
        return len(self.resolve_layers(num_layers)) * len(self.slots)

    def resolve_layers(self, num_layers: int) -> list[int]:
        """The sorted, non-negative layer indices this config covers on a model of that depth."""
        if self.layers is None:
            return list(range(num_layers))
        out = set()
        for i in self.layers:
            j = i + num_layers if i < 0 else i
            if not 0 <= j < num_layers:
                raise ConfigError(f"layer index {i} is out of range for a model with {num_layers} layers")
            out.add(j)
        return sorted(out)

    def params_per_adapter(self, hidden_size: int) -> int:
        """2md + d + m: both projection matrices plus their biases."""
        return 2 * self.size * hidden_size + hidden_size + self.size

    # ---- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["slots"] = list(self.slots)
        d["layers"] = None if self.layers is None else list(self.layers)
        d["fuse"] = list(self.fuse)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Build from a dict; unknown fields are an error, never silently dropped."""
        if not isinstance(data, dict):
            raise ConfigError(f"an adapter config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown adapter config field(s) {unknown}; known fields are {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as e:  # e.g. a wrong type that the checks above could not phrase
            raise ConfigError(f"invalid adapter config: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ConfigError(f"adapter config is not valid JSON: {e}") from None


PRESETS: dict[str, AdapterConfig] = {
    # Houlsby et al. 2019: two sequential adapters per layer.
    "houlsby": AdapterConfig(slots=("attn", "ffn"), mode="sequential"),
    # Pfeiffer et al. 2020 (AdapterHub's seq_bn): one adapter per layer, after the feed-forward
    # block's add-and-norm, reading norm(h + x), ReLU; the layer norm runs again after it.
    "pfeiffer": AdapterConfig(slots=("ffn",), mode="sequential", norm_before=True, nonlinearity="relu"),
    # Houlsby's adapter at the feed-forward slot only (what "pfeiffer" meant before 2026-12).
    "houlsby-ffn": AdapterConfig(slots=("ffn",), mode="sequential"),
    # He et al. 2022: parallel adapter beside the feed-forward block, scale 4.
    "parallel": AdapterConfig(slots=("ffn",), mode="parallel", scale=4.0, zero_init_up=True),
}
