"""What an engine's gated module is: its shape, place and base model, as plain data.

`SlotInfo` travels between processes (collective_rpc results are msgpack-encoded), so it
holds only str / int / float / bool / None. `check_adapter` compares an adapter with it
and raises the same errors as the transformers loader; the caller runs it before any
worker is asked to load, so errors keep their NKV class across process boundaries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from nkv.adapter import NKVAdapter
from nkv.compat import check_fingerprint, check_shape
from nkv.errors import NKVCompatibilityError
from nkv.header import NKVHeader


@dataclass(frozen=True)
class SlotInfo:
    """One worker's view of the gated module (identical on every rank but tp_rank)."""

    module: str  # e.g. "model.layers.1.mlp.down_proj"
    layer: int
    capacity: int
    model_type: str
    n_layers: int
    d_model: int
    d_key: int  # full width, not the rank's slice
    fingerprint: str | None  # None when the weights could not be read (quantized or repacked)
    tp_rank: int
    tp_size: int
    n_facts: int = 0  # rows in use now
    gamma: float | None = None  # threshold in use now
    source: str | None = None  # what was loaded last (path or repo id)
    revision: str | None = None  # its Hub revision (the commit it was pinned to), if a repo id
    digest: str | None = None  # sha256 of the loaded file's bytes: equal on every rank
    # Named adapters (requests choose one; the fields above describe the engine-wide one):
    max_adapters: int = 0  # how many may be resident; 0 = the engine-wide adapter only
    named: list[dict[str, Any]] = field(default_factory=list)  # {name, n_facts, gamma, source, revision, digest}
    routing: bool = False  # the worker's model runner routes each request's tokens to its adapter
    sketch: bool = False  # the gate can take the sketch path (spec §5.1): sketch buffers allocated
    shortlist: int = 0  # candidates per token that path rescores exactly (the config's "shortlist"); 0 without it
    residual_site: str = "output"  # where rows are added (spec §5): the model family's, fixed at start-up

    @property
    def rows_in_use(self) -> int:
        return self.n_facts + sum(entry["n_facts"] for entry in self.named)

    def named_entry(self, name: str) -> dict[str, Any] | None:
        return next((entry for entry in self.named if entry["name"] == name), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SlotInfo":
        return cls(**data)


def check_adapter(adapter: NKVAdapter | NKVHeader, slot: SlotInfo, strict: bool = True, stacklevel: int = 3,
                  name: str | None = None) -> None:
    """Raise unless `adapter` can be loaded into `slot` (under `name`, or as the engine-wide
    adapter when None); warn on a fingerprint mismatch if not strict.

    Reads only `.base`, `.layer`, `.residual_site` and `.n_facts`, so a file's header (no
    tensors) will do.

    Raises:
        NKVCompatibilityError: model type, layer count, widths, layer or residual site differ,
            or the adapter holds more facts than the slot's capacity.
        NKVFingerprintError: the engine's weights are not the adapter's base checkpoint.
    """
    check_shape(adapter.base, adapter.layer, model_type=slot.model_type, n_layers=slot.n_layers,
                d_model=slot.d_model, d_key=slot.d_key)
    if adapter.layer != slot.layer:
        raise NKVCompatibilityError(
            f"adapter edits layer {adapter.layer}, but this engine's gated module is at layer {slot.layer} "
            f"({slot.module}); the layer is fixed when the engine starts: restart it with "
            f"additional_config={{'nkv': {{'layer': {adapter.layer}, ...}}}}, or rebuild the adapter at layer "
            f"{slot.layer}")
    if adapter.residual_site != slot.residual_site:
        raise NKVCompatibilityError(
            f"adapter adds its rows at residual site {adapter.residual_site!r}, but this engine adds them at "
            f"{slot.residual_site!r}, the site of {slot.model_type!r} models (spec §5): the adapter was built by an "
            "older nkv; rebuild it (nkv build) to serve it in vLLM")
    check_room(adapter.n_facts, slot, name)
    check_fingerprint(adapter.base, adapter.layer, slot.fingerprint, strict=strict, stacklevel=stacklevel)

def check_room(n_facts: int, slot: SlotInfo, name: str | None = None) -> None:
    """Raise unless `n_facts` rows fit, next to the other resident adapters' rows, and a new
    name fits under `max_adapters`. Replacing an adapter frees its own rows first."""
    if name is not None:
        if slot.max_adapters == 0:
            raise NKVCompatibilityError(
                f"this engine holds one engine-wide adapter, not named ones (adapter {name!r}); restart it with "
                "additional_config={'nkv': {'max_adapters': N, 'capacity': ROWS, 'layer': L}} to serve several")
        names = [entry["name"] for entry in slot.named]
        if name not in names and len(names) >= slot.max_adapters:
            raise NKVCompatibilityError(
                f"the engine already holds {len(names)} named adapters ({', '.join(names)}), its max_adapters; "
                f"unload one first, or restart it with a larger 'max_adapters'")
    replaced = slot.named_entry(name) if name is not None else {"n_facts": slot.n_facts}
    others = slot.rows_in_use - (replaced["n_facts"] if replaced else 0)
    if n_facts + others > slot.capacity:
        held = f" ({others} rows are held by the other resident adapters)" if others else ""
        raise NKVCompatibilityError(
            f"adapter holds {n_facts} facts, but the engine preallocated room for {slot.capacity}{held}; "
            f"restart it with additional_config={{'nkv': {{'capacity': {n_facts + others}, ...}}}} or more"
            + (", or unload an adapter first" if others else ""))


__all__ = ["SlotInfo", "check_adapter", "check_room"]
