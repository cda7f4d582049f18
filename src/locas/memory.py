"""The Memory: a side MLP of `width` slots in every layer, with a batch axis.

Tensors, all float32 (the master copy, whatever the backbone's dtype):

    up    (layers, batch, width, hidden)   keys (the up projection rows)
    gate  (layers, batch, width, hidden)   gate rows (gated families only)
    down  (layers, batch, width, hidden)   values, one output vector per slot
    tau   (layers, batch, width)           output scale per slot (not trained)

Layer l adds `sum_j tau[l, b, j] * act_j(x) * down[l, b, j]` to the MLP output of sequence b, where
`act_j(x) = act(gate_j . x) * (up_j . x)` (gated) or `act(up_j . x)` (2-layer MLP). Keeping tau per
slot makes concatenating two memories exactly the sum of their outputs, and per sequence lets each
memory of a batch keep the scale measured on its own text. A memory with batch 1 serves any batch size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from locas.data import with_default_permissions

FORMAT_VERSION = 2  # 2: tau (layers, batch, width); version 1 files (tau (layers, width)) still load
READABLE_VERSIONS = (1, 2)
SLOT_TENSORS = ("up", "gate", "down")


def _project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (batch, seq, in) times each sequence's weight (batch or 1, out, in) transposed."""
    if weight.shape[0] == 1:  # one memory for every sequence: a plain linear is much faster than a broadcast bmm
        return F.linear(x, weight[0])
    return x @ weight.transpose(-1, -2)


def _numbers(value: object) -> bool:
    """Whether `value` is a non-empty list of finite numbers."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def _metadata_problem(metadata: dict, layers: int) -> str | None:
    """What is wrong with the metadata fields that checking a memory against a model reads, or None."""
    scales = metadata.get("output_scales")
    if scales is not None and not (_numbers(scales) and len(scales) == layers):
        return f"output_scales must be a list of {layers} numbers, one per layer"
    signature = metadata.get("weight_signature")
    if signature is not None and not (
        isinstance(signature, list)
        and len(signature) == layers
        and all(_numbers(row) and len(row) == len(signature[0]) for row in signature)
    ):
        return f"weight_signature must be a list of {layers} equally long lists of numbers, one per layer"
    return None


class Memory(nn.Module):
    """Trainable slot tensors plus the metadata needed to check them against a base model.

    `tau` has shape (layers, batch, width), or (layers, 1, width) or (layers, width) for one scale shared by the
    whole batch.
    """

    def __init__(
        self,
        up: torch.Tensor,
        down: torch.Tensor,
        tau: torch.Tensor,
        gate: torch.Tensor | None = None,
        metadata: dict | None = None,
    ) -> None:
        super().__init__()
        if up.dim() != 4 or down.shape != up.shape or (gate is not None and gate.shape != up.shape):
            raise ValueError(
                "memory tensors must all have shape (layers, batch, width, hidden); got "
                f"up {tuple(up.shape)}, down {tuple(down.shape)}, gate {None if gate is None else tuple(gate.shape)}"
            )
        layers, batch, width, _ = up.shape
        if tau.shape == (layers, width):
            tau = tau.unsqueeze(1)
        if tau.shape == (layers, 1, width):  # one scale shared by the batch
            tau = tau.expand(layers, batch, width)
        if tau.shape != (layers, batch, width):
            raise ValueError(
                f"tau must have shape (layers, batch, width) = {(layers, batch, width)}, (layers, 1, width) or "
                f"(layers, width), got {tuple(tau.shape)}"
            )
        device = up.device  # every tensor where the keys are (a tau measured on the model's device, say)
        self.up = nn.Parameter(up.float())
        self.register_parameter("gate", None if gate is None else nn.Parameter(gate.to(device, torch.float32)))
        self.down = nn.Parameter(down.to(device, torch.float32))
        self.register_buffer("tau", tau.to(device, torch.float32).contiguous())
        self.metadata = dict(metadata or {})
        self._unbound: dict[str, tuple] = {}  # see _layers_of

    # --- shape -------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.up.shape[0]

    @property
    def batch_size(self) -> int:
        return self.up.shape[1]

    @property
    def width(self) -> int:
        return self.up.shape[2]

    @property
    def hidden_size(self) -> int:
        return self.up.shape[3]

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in SLOT_TENSORS if getattr(self, name) is not None}

    def non_finite(self) -> str | None:
        """The name of the first tensor (up, gate, down, tau) holding NaN or inf, or None."""
        tensors = {**self.slot_tensors(), "tau": self.tau}
        return next((name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()), None)

    def _new(self, metadata_update: dict | None = None, **tensors: torch.Tensor) -> Memory:
        return Memory(**tensors, metadata={**self.metadata, **(metadata_update or {})})

    # --- the computation ---------------------------------------------------------------------

    def _layer_tensors(self, layer: int, batch: int, rows: torch.Tensor | None) -> tuple:
        """(up, gate, down, tau) of layer `layer` for a batch of `batch` sequences (`rows`: see layer_output)."""
        tensors = (self._layers_of(name) for name in ("up", "gate", "down", "tau"))
        tensors = (None if t is None else t[layer] for t in tensors)
        if rows is not None:  # indexing keeps the graph: gradients reach only the picked memories
            tensors = (None if t is None else t[rows] for t in tensors)
        up, gate, down, tau = tensors
        if up.shape[0] not in (1, batch):
            serving = (
                f"{up.shape[0]} memories picked by rows" if rows is not None else f"a memory with batch {up.shape[0]}"
            )
            raise ValueError(
                f"{serving} cannot serve a batch of {batch} sequences; "
                "use a memory of batch 1 or one memory per sequence"
            )
        return up, gate, down, tau

    def _layers_of(self, name: str) -> torch.Tensor | tuple[torch.Tensor, ...] | None:
        """Tensor `name`, or while an eager forward records its gradient its per-layer views from one `unbind`, made
        again only when the tensor changes (an optimizer step, new data, a move): indexing it once per layer instead
        adds a backward per layer that fills a zero gradient of the whole tensor (A/Bs of a CPU step: -3.6%,
        +3.5%, -4.9%)."""
        tensor = getattr(self, name)
        if torch.compiler.is_compiling() or tensor is None:  # compiled: first, so that dynamo traces none of this
            return tensor
        if (
            not (torch.is_grad_enabled() and tensor.requires_grad and tensor.is_leaf)
            or torch.is_inference_mode_enabled()
        ):
            return tensor
        try:
            key = (tensor._version, tensor.data_ptr(), tensor.shape, tensor.stride())
        except RuntimeError:  # a tensor without storage (torch.func's wrappers): no views to keep
            return tensor
        cached = self._unbound.get(name)
        if cached is None or cached[0] is not tensor or cached[1] != key:
            del cached  # first, with its graph: that would keep the tensor's old shape for its gradient
            self._unbound.pop(name, None)
            cached = self._unbound[name] = (tensor, key, tensor.unbind(0))
        return cached[2]

    def _apply(self, fn, recurse: bool = True):
        self._unbound.clear()  # views of the tensors being replaced would keep them alive, or block a swap
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._unbound.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_unbound": {}}  # views with autograd history can be neither pickled nor copied

    @staticmethod
    def _activations(x: torch.Tensor, up: torch.Tensor, gate: torch.Tensor | None, activation: nn.Module):
        hidden = _project(x, up.to(x.dtype))
        if gate is not None:
            return activation(_project(x, gate.to(x.dtype))) * hidden
        return activation(hidden)

    def slot_activations(
        self, layer: int, x: torch.Tensor, activation: nn.Module, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`act_j(x)` of every slot of layer `layer` for input `x` (batch, seq, hidden): (batch, seq, width)."""
        up, gate, _, _ = self._layer_tensors(layer, x.shape[0], rows)
        return self._activations(x, up, gate, activation)

    def layer_output(
        self, layer: int, x: torch.Tensor, activation: nn.Module, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """This memory's contribution to layer `layer`'s MLP output for input `x` (batch, seq, hidden).

        `rows` picks which of the batch's memories serve the sequences of `x` (default: all, in order).
        """
        up, gate, down, tau = self._layer_tensors(layer, x.shape[0], rows)
        hidden = self._activations(x, up, gate, activation)
        values = down * tau.unsqueeze(-1)  # (batch, width, hidden)
        return _project(hidden, values.transpose(-1, -2).to(x.dtype))

    @torch.no_grad()
    def clip_(self, max_norm: float = 1.0) -> Memory:
        """Rescale every slot vector (key, gate and value rows) to norm at most `max_norm`, in place."""
        for tensor in self.slot_tensors().values():
            norms = tensor.norm(dim=-1, keepdim=True)
            tensor.mul_(max_norm / norms.clamp_min(max_norm))
        return self

    # --- composition -------------------------------------------------------------------------

    def select(self, index: int) -> Memory:
        """The memory of one sequence of the batch, as a batch-1 memory."""
        if not -self.batch_size <= index < self.batch_size:
            raise IndexError(f"memory index {index} out of range for a batch of {self.batch_size}")
        index %= self.batch_size
        tensors = {name: t.detach()[:, index : index + 1].clone() for name, t in self.slot_tensors().items()}
        return self._new(**tensors, tau=self.tau[:, index : index + 1].clone())

    def zeros_like(self) -> Memory:
        """A memory of the same shape, tau and metadata with all-zero slots (it adds nothing)."""
        return self._new(
            **{name: torch.zeros_like(t.detach()) for name, t in self.slot_tensors().items()}, tau=self.tau.clone()
        )

    @classmethod
    def stack(cls, memories: list[Memory]) -> Memory:
        """One memory whose batch holds `memories` in order (same layers, width and base model), each with its tau."""
        if not memories:
            raise ValueError("no memories to stack: pass a list of one or more")
        first = memories[0]
        for other in memories[1:]:
            first._check_compatible(other, batch=False)
            if other.width != first.width:
                raise ValueError("only memories of the same width can be stacked into one batch")
        tensors = {
            name: torch.cat([m.slot_tensors()[name].detach() for m in memories], dim=1) for name in first.slot_tensors()
        }
        return first._new(**tensors, tau=torch.cat([m.tau for m in memories], dim=1))

    def concat(self, other: Memory) -> Memory:
        """A memory of width `self.width + other.width` whose output is exactly the sum of both outputs."""
        self._check_compatible(other)
        tensors = {  # on this memory's device (e.g. slots grown on the CPU for a memory on the GPU)
            name: torch.cat([t.detach(), other.slot_tensors()[name].detach().to(t.device)], dim=2)
            for name, t in self.slot_tensors().items()
        }
        update = {
            "tokens_memorized": self.metadata.get("tokens_memorized", 0) + other.metadata.get("tokens_memorized", 0)
        }
        for key in ("init", "tau_rule"):  # e.g. "highest+random" for the slots of two inits
            values = [m.metadata.get(key) for m in (self, other)]
            if values != [None, None]:
                update[key] = values[0] if values[0] == values[1] else "+".join(map(str, values))
        return self._new(
            update,
            **tensors,
            tau=torch.cat([self.tau, other.tau.to(self.tau.device)], dim=2),
        )

    def remove_slots(self, slots: list[int] | torch.Tensor) -> Memory:
        """A copy without the given slot indices (the same slots in every layer)."""
        slots = torch.as_tensor(slots, dtype=torch.long).flatten()
        if slots.numel() and (slots.min() < 0 or slots.max() >= self.width):
            raise IndexError(f"slot indices must lie in [0, {self.width}); got {slots.tolist()}")
        keep = torch.ones(self.width, dtype=torch.bool)
        keep[slots] = False
        if not keep.any():
            raise ValueError("removing every slot would leave an empty memory")
        tensors = {name: t.detach()[:, :, keep].clone() for name, t in self.slot_tensors().items()}
        return self._new(**tensors, tau=self.tau[:, :, keep].clone())

    def _check_compatible(self, other: Memory, batch: bool = True) -> None:
        def shape(memory: Memory) -> tuple:
            size = memory.batch_size if batch else None
            return (memory.num_layers, size, memory.hidden_size, memory.gated, memory.metadata.get("fingerprint"))

        if shape(self) != shape(other):
            raise ValueError(
                "cannot combine memories of different shape or base model: "
                f"(layers, batch, hidden, gated, fingerprint) {shape(self)} vs {shape(other)}"
            )

    # --- files -------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the tensors and metadata to one safetensors file, atomically; a memory holding NaN or inf (a
        diverged training) is refused, as `load` would refuse the file."""
        if (name := self.non_finite()) is not None:
            raise ValueError(f"this memory's {name} holds NaN or inf (its training diverged): it is not saved")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.slot_tensors().items()}
        tensors["tau"] = self.tau.detach().contiguous().cpu()
        metadata = {**self.metadata, "format_version": FORMAT_VERSION, "width": self.width, "gated": self.gated}
        temporary = path.with_name(path.name + ".partial")
        try:
            save_file(tensors, str(temporary), metadata={"locas": json.dumps(metadata)})
            with_default_permissions(temporary).replace(path)
        except SafetensorError as error:  # e.g. a folder it may not write in
            raise OSError(f"cannot write memory file {str(path)!r}: {error}") from error
        finally:
            temporary.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Memory:
        """Read a memory file (no check against a model: see `locas.load_memory`)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"memory file {str(path)!r} does not exist")
        if not path.is_file():
            raise ValueError(f"memory path {str(path)!r} is a folder, not a memory file")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
            tensors = load_file(str(path))
        except Exception as error:  # safetensors raises several types for a corrupt file
            raise ValueError(f"{str(path)!r} is not a readable safetensors file: {error}") from error
        if "locas" not in header:
            raise ValueError(f"{str(path)!r} is a safetensors file but not a locas memory (no 'locas' metadata)")
        try:
            metadata = json.loads(header["locas"])
        except json.JSONDecodeError as error:
            raise ValueError(f"{str(path)!r} has unreadable locas metadata ({error})") from error
        if not isinstance(metadata, dict):
            raise ValueError(f"{str(path)!r} has unreadable locas metadata (not a JSON object)")
        version = metadata.get("format_version")
        if version not in READABLE_VERSIONS:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            raise ValueError(
                f"{str(path)!r} has memory format version {version}; this locas reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
                + (": update locas to read it" if newer else ": the file is not a valid locas memory")
            )
        missing = [name for name in ("up", "down", "tau") if name not in tensors]
        if missing or metadata.get("gated") != ("gate" in tensors):
            raise ValueError(f"{str(path)!r} is an incomplete locas memory (missing tensors: {missing or ['gate']})")
        for key in ("format_version", "width", "gated"):
            metadata.pop(key, None)
        memory = cls(
            up=tensors["up"], gate=tensors.get("gate"), down=tensors["down"], tau=tensors["tau"], metadata=metadata
        )
        if name := memory.non_finite():
            raise ValueError(
                f"{str(path)!r} holds non-finite values (NaN or inf) in {name!r}; it is corrupt: "
                "memorize or train it again"
            )
        if problem := _metadata_problem(metadata, memory.num_layers):
            raise ValueError(f"{str(path)!r} has unreadable locas metadata ({problem})")
        return memory
