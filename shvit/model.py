"""SHViT: Single-Head Vision Transformer (Yun & Ro, CVPR 2024).

The module tree and parameter names are the authors' (``patch_embed``,
``blocks1`` .. ``blocks3``, ``head``); state dicts in timm's layout
(``stages.i.downsample`` / ``stages.i.blocks``) load as well.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import shvit_kernels
from shvit_kernels.plan import Plan

from .checkpoint import timm_to_official
from .layers import (
    FFN, BasicBlock, BN_Linear, Conv2d_BN, PatchMerging, Residual, cpu_plan, fold_fused_inference, fuse_modules,
)

__all__ = ["SHViT", "VARIANTS", "shvit_s1", "shvit_s2", "shvit_s3", "shvit_s4", "create_model"]

# The stem's convolutions run on this many bytes of activations per thread at a time (input
# and output of the largest, as many images as fit, at least one; docs/kernels.md, "The
# plan"), not on the whole batch.
STEM_CHUNK_BYTES = 4 << 20

_DEFAULT_DOWN_OPS = (("subsample", 2), ("subsample", 2), ("",))


def _triple(v: Any, name: str) -> tuple:
    if isinstance(v, (int, str)):
        v = (v,) * 3
    v = tuple(v)
    if len(v) != 3:
        raise ValueError(f"{name} must have 3 entries (one per stage), got {v!r}")
    return v


def _down_block(dim: int, out_dim: int) -> list[nn.Module]:
    """The authors' stage transition: dw conv + FFN, PatchMerging, dw conv + FFN."""
    return [
        nn.Sequential(
            Residual(Conv2d_BN(dim, dim, 3, 1, 1, groups=dim)),
            Residual(FFN(dim, int(dim * 2))),
        ),
        PatchMerging(dim, out_dim),
        nn.Sequential(
            Residual(Conv2d_BN(out_dim, out_dim, 3, 1, 1, groups=out_dim)),
            Residual(FFN(out_dim, int(out_dim * 2))),
        ),
    ]


class SHViT(nn.Module):
    """SHViT with the authors' constructor arguments.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs; 0 replaces the head by an identity.
        embed_dim, partial_dim, qk_dim, depth, types: one entry per stage.
        down_ops: the authors' stage-transition spec; only their value is supported.
        distillation: add ``head_dist``; in eval the two heads are averaged.
        fused: run every SHSA mixer through the fused ops of ``shvit_kernels`` (same
            parameters, names and checkpoints as the reference).
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: Sequence[int] = (128, 256, 384),
        partial_dim: Sequence[int] = (32, 64, 96),
        qk_dim: Sequence[int] | int = (16, 16, 16),
        depth: Sequence[int] = (1, 2, 3),
        types: Sequence[str] = ("s", "s", "s"),
        down_ops: Sequence[Sequence[Any]] = _DEFAULT_DOWN_OPS,
        distillation: bool = False,
        fused: bool = False,
    ):
        super().__init__()
        embed_dim = _triple(embed_dim, "embed_dim")
        partial_dim = _triple(partial_dim, "partial_dim")
        qk_dim = _triple(qk_dim, "qk_dim")
        depth = _triple(depth, "depth")
        types = _triple(types, "types")
        if [tuple(d) for d in down_ops] != [tuple(d) for d in _DEFAULT_DOWN_OPS]:
            raise ValueError(f"only the authors' down_ops {_DEFAULT_DOWN_OPS} are supported, got {down_ops!r}")
        if embed_dim[0] % 8:
            raise ValueError(f"embed_dim[0] must be a multiple of 8, got {embed_dim[0]}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.distillation = distillation
        self.fused = fused
        self.embed_dim = embed_dim
        self.num_features = self.head_hidden_size = embed_dim[-1]

        e0 = embed_dim[0]
        self.patch_embed = nn.Sequential(
            Conv2d_BN(in_chans, e0 // 8, 3, 2, 1),
            nn.ReLU(),
            Conv2d_BN(e0 // 8, e0 // 4, 3, 2, 1),
            nn.ReLU(),
            Conv2d_BN(e0 // 4, e0 // 2, 3, 2, 1),
            nn.ReLU(),
            Conv2d_BN(e0 // 2, e0, 3, 2, 1),
        )
        stages: list[list[nn.Module]] = [[], [], []]
        for i in range(3):
            if i > 0:
                stages[i].extend(_down_block(embed_dim[i - 1], embed_dim[i]))
            for _ in range(depth[i]):
                stages[i].append(BasicBlock(embed_dim[i], qk_dim[i], partial_dim[i], types[i], fused=fused))
        self.blocks1 = nn.Sequential(*stages[0])
        self.blocks2 = nn.Sequential(*stages[1])
        self.blocks3 = nn.Sequential(*stages[2])

        self.feature_info = [
            dict(num_chs=embed_dim[i], reduction=2 ** (4 + i), module=f"blocks{i + 1}") for i in range(3)
        ]
        self.head = BN_Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
        if distillation:
            self.head_dist = BN_Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()

    # ----------------------------------------------------------------- loading
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Accept timm's layout: rename its keys in place before the children load.
        timm_to_official(state_dict, prefix=prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----------------------------------------------------------------- forward
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SHViT expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"SHViT expects input of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"SHViT expects {self.in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})"
            )
        if not x.is_floating_point():
            raise TypeError(f"SHViT expects a floating-point input, got {x.dtype}")
        w = next(self.patch_embed.parameters())
        if x.device != w.device:
            raise ValueError(f"x is on {x.device} but the model's parameters are on {w.device}: move one to the other")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"x is {x.dtype} but the model's parameters are {w.dtype}: convert one to the other "
                "(or run under torch.autocast)"
            )

    def stages(self) -> list[nn.Sequential]:
        return [self.blocks1, self.blocks2, self.blocks3]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        cpu = self._cpu_plan(x)
        if cpu is None:
            self._check_input(x)
        return self._features(x, cpu)

    def _features(self, x: torch.Tensor, cpu: tuple[Plan, int] | None) -> torch.Tensor:
        if cpu is not None:
            out = cpu[0].run(x, cpu[1])
            if out is not None:
                return out
            self._drop_plans()  # a parameter or buffer changed: the plan is made again
            return self.forward_features(x)
        x = self.patch_embed(x)
        x = self.blocks1(x)
        x = self.blocks2(x)
        return self.blocks3(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        if pre_logits:
            return x
        if self.distillation:
            out, out_dist = self.head(x), self.head_dist(x)
            if self.training and not torch.jit.is_scripting():
                return out, out_dist
            return (out + out_dist) / 2
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the plan first: it is made only for an input that _check_input passes
        cpu = self._cpu_plan(x)
        if cpu is not None and len(cpu[0]) > cpu[1]:  # the plan has the head
            out = cpu[0].run(x)
            if out is not None:
                return out
            self._drop_plans()  # a parameter or buffer changed: the plan is made again
            return self.forward(x)
        if cpu is None:
            self._check_input(x)
        twin = self._float32_twin(x)
        if twin is not None:
            return twin(x.float()).to(x.dtype)
        return self.forward_head(self._features(x, cpu))

    def _float32_twin(self, x: torch.Tensor) -> "SHViT | None":
        """For a folded fused bfloat16 model on a CPU without bfloat16 hardware, in inference
        on the cpp backend: a float32 copy of the model, cached until a parameter changes.
        There emulated bfloat16 is slower than the float32 kernels, so the model runs those
        (the input cast to float32, the logits back to bfloat16). ``None`` otherwise."""
        if (
            not self.__dict__.get("_folded_fused")
            or x.dtype is not torch.bfloat16
            or not x.is_cpu
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or shvit_kernels.onednn.bf16_hardware()
            or shvit_kernels.backend.select(x) != "cpp"
        ):
            return None
        cached = self.__dict__.get("_twin")
        if cached is None or cached[0].changed(self):
            self.__dict__.pop("_twin", None)
            snapshot = _Snapshot(self)
            twin = None
            if all(t.dtype is torch.bfloat16 for t in snapshot.tensors):
                with torch.no_grad():
                    twin = copy.deepcopy(self).float()
            self.__dict__["_twin"] = cached = (snapshot, twin)  # not a submodule: no state dict entries
        return cached[1]

    def _cpu_plan(self, x: torch.Tensor) -> tuple[Plan, int] | None:
        """For a folded fused model in CPU inference on a valid input (a CPU float32 or bfloat16
        tensor of shape (B > 0, in_chans, H, W); no gradient to compute, not compiling, tracing
        or exporting, the cpp backend on a CPU with the packed GEMM): the model as one
        chain of C++ ops (``layers.cpu_plan``; pooling and classifier as a last step where the
        head is one Linear) and how many of its steps make the features; cached until a
        parameter or buffer changes. float32 parameters and input run the float32 kernels;
        on a CPU with bfloat16 hardware, bfloat16 ones, or float32 ones under CPU bfloat16
        autocast, run the oneDNN blocks of ``shvit_kernels.onednn``. ``None`` otherwise (the
        modules run one by one)."""
        if (
            not isinstance(x, torch.Tensor)
            or not x.is_cpu
            or x.dtype not in (torch.float32, torch.bfloat16)
            or x.dim() != 4
            or x.shape[1] != self.in_chans
            or x.numel() == 0
            or not self.__dict__.get("_folded_fused")
            or torch.compiler.is_compiling()  # torch.export and the dynamo ONNX exporter too
            or torch.jit.is_tracing()  # the TorchScript ONNX exporter too
            or shvit_kernels.backend.requested() not in ("auto", "cpp")
        ):
            return None
        autocast = torch.is_autocast_enabled("cpu")
        if autocast and torch.get_autocast_dtype("cpu") is not torch.bfloat16:
            return None
        grad = torch.is_grad_enabled()
        slot = "_plan_autocast" if autocast else "_plan"
        cached = self.__dict__.get(slot)
        if cached is None or (cached[3] and not grad) or cached[0].changed(self):
            if not shvit_kernels.backend.cpp_available() or not shvit_kernels.pointwise.gemm_available():
                return None
            tensors = [*self.parameters(), *self.buffers()]
            needs_grad = any(t.requires_grad for t in tensors)
            deferred = grad and needs_grad  # autograd runs through the modules: made once it can run
            cpu = steps = None
            dtype = tensors[0].dtype if tensors else torch.float32
            bf16 = autocast or dtype is torch.bfloat16
            if (
                not deferred
                and dtype in (torch.float32, torch.bfloat16)
                and all(t.dtype is dtype and t.device.type == "cpu" for t in tensors)
                and (not bf16 or shvit_kernels.onednn.bf16_hardware())
            ):
                stem = cpu_plan([self.patch_embed], True, bf16)
                rest = None if stem is None else cpu_plan([self.blocks1, self.blocks2, self.blocks3], False, bf16)
                steps = None if rest is None else stem + rest
            if steps is not None:
                features = len(steps)
                if isinstance(self.head, nn.Linear) and self.head.bias is not None and not self.distillation:
                    pool_linear = shvit_kernels.onednn if bf16 else shvit_kernels.pointwise
                    steps.append(pool_linear.pool_linear_step(self.head.weight, self.head.bias))
                plan = Plan(steps, tensors)
                if not bf16:  # bfloat16 halves the activations, and oneDNN's cost per call made chunks no faster
                    plan.chunk_prefix(len(stem), 4 * self._stem_elements_per_pixel(), STEM_CHUNK_BYTES)
                cpu = (plan, features)
            snapshot = _Snapshot(self, plan_watches=cpu is not None)
            # the input dtype the plan takes: under autocast float32 or bfloat16 (cast as autocast would)
            self.__dict__[slot] = cached = (snapshot, cpu, needs_grad, deferred, None if autocast else dtype)
        if grad and (cached[2] or x.requires_grad):
            return None  # autograd runs through the modules
        return cached[1] if cached[4] is None or cached[4] is x.dtype else None

    def _drop_plans(self) -> None:
        for slot in ("_plan", "_plan_autocast"):
            self.__dict__.pop(slot, None)

    def _stem_elements_per_pixel(self) -> float:
        """Elements of the stem's largest convolution input + output per pixel of the image."""
        worst, area = 0.0, 1
        for m in self.patch_embed.modules():
            if isinstance(m, nn.Conv2d):
                out_area = area * m.stride[0] * m.stride[1]
                worst = max(worst, m.in_channels / area + m.out_channels / out_area)
                area = out_area
        return worst

    def __getstate__(self):
        state = super().__getstate__()
        for slot in ("_plan", "_plan_autocast"):
            state.pop(slot, None)  # bound C++ calls do not pickle; the plan is rebuilt on use
        return state

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Stage outputs for dense tasks, as in timm.

        Args:
            indices: the last ``n`` stages if an int, else the stage indices to return
                (default: all three, strides 16, 32, 64).
            stop_early: stop after the last requested stage (final features are then
                that stage's output).
            intermediates_only: return only the list of stage outputs.

        Returns:
            ``(final_features, [stage outputs])`` or only the list.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        if indices is None:
            take = [0, 1, 2]
        elif isinstance(indices, int):
            if not 0 < indices <= 3:
                raise ValueError(f"indices as an int must be in 1..3, got {indices}")
            take = list(range(3 - indices, 3))
        else:
            take = sorted(int(i) % 3 for i in indices)
        self._check_input(x)
        x = self.patch_embed(x)
        out = []
        stages = self.stages()
        last = max(take) if (stop_early or intermediates_only) else 2
        for i in range(last + 1):
            x = stages[i](x)
            if i in take:
                out.append(x)
        if intermediates_only:
            return out
        return x, out

    # --------------------------------------------------------------- inference
    @torch.no_grad()
    def fuse(self) -> "SHViT":
        """Fold every BatchNorm (convs, residual depthwise convs, head) for inference.

        Changes the module tree in place (the state dict is then no longer a
        checkpoint layout) and returns the model.
        """
        for name, child in self.named_children():
            setattr(self, name, fuse_modules(child))
        if self.fused:
            # CPU inference of the folded fused model runs channels_last (token-major) from the
            # first conv's output on (that conv reads the NCHW image): the 1x1 convs are GEMMs with
            # fused bias/ReLU/residual epilogues (FFNs one op each), depthwise and stem convs have
            # the ReLU fused, and the SHSA block op needs no transposes
            for name, child in self.named_children():
                setattr(self, name, fold_fused_inference(child))
            self.to(memory_format=torch.channels_last)
            self._folded_fused = True
        return self


# Counts registrations of parameters, buffers and submodules on any module (so that a snapshot
# looks for a replaced parameter or module only after one of these).
_registrations = 0


def _count_registration(*_args) -> None:
    global _registrations
    _registrations += 1


for _register in (
    nn.modules.module.register_module_parameter_registration_hook,
    nn.modules.module.register_module_buffer_registration_hook,
    nn.modules.module.register_module_module_registration_hook,
):
    _register(_count_registration)


class _Snapshot:
    """A module's parameters and buffers as they were when something was derived from them:
    ``changed(module)`` once one is moved to other storage or changed in place, or a
    parameter, buffer or submodule of the module is replaced. Per call it reads each tensor's
    storage address and version counter, unless a ``Plan`` watches them (``plan_watches``: its
    ``run`` returns ``None`` once one changed); the module tree is walked again only after a
    registration somewhere (then, if the module's own tree is the same, nothing changed)."""

    def __init__(self, module: nn.Module, plan_watches: bool = False):
        self.registrations = _registrations
        self.tree = self._tree(module)
        self.tensors = [*module.parameters(), *module.buffers()]
        # an inference tensor has no version counter (and cannot change outside inference mode)
        self.versioned = [t for t in self.tensors if not t.is_inference()]
        self.key = None if plan_watches else self._key()

    @staticmethod
    def _tree(module: nn.Module) -> tuple:
        return tuple(map(id, module.modules())), tuple(map(id, (*module.parameters(), *module.buffers())))

    def _key(self) -> tuple:
        return tuple(t.data_ptr() for t in self.tensors), tuple(t._version for t in self.versioned)

    def changed(self, module: nn.Module) -> bool:
        if self.key is not None and self._key() != self.key:
            return True
        if self.registrations != _registrations:
            if self._tree(module) != self.tree:
                return True
            self.registrations = _registrations
        return False


VARIANTS: dict[str, dict[str, Any]] = {
    "shvit_s1": dict(embed_dim=(128, 224, 320), depth=(2, 4, 5), partial_dim=(32, 48, 68)),
    "shvit_s2": dict(embed_dim=(128, 308, 448), depth=(2, 4, 5), partial_dim=(32, 66, 96)),
    "shvit_s3": dict(embed_dim=(192, 352, 448), depth=(3, 5, 5), partial_dim=(48, 75, 96)),
    "shvit_s4": dict(embed_dim=(224, 336, 448), depth=(4, 7, 6), partial_dim=(48, 72, 96)),
}
_COMMON = dict(qk_dim=(16, 16, 16), types=("i", "s", "s"))


def create_model(name: str, num_classes: int = 1000, **kwargs: Any) -> SHViT:
    """Build a named variant (``shvit_s1`` .. ``shvit_s4``); kwargs override its config."""
    if name not in VARIANTS:
        raise ValueError(f"unknown SHViT variant {name!r}; choose one of {sorted(VARIANTS)}")
    cfg = {**_COMMON, **VARIANTS[name], **kwargs}
    return SHViT(num_classes=num_classes, **cfg)


def shvit_s1(num_classes: int = 1000, **kwargs: Any) -> SHViT:
    return create_model("shvit_s1", num_classes, **kwargs)


def shvit_s2(num_classes: int = 1000, **kwargs: Any) -> SHViT:
    return create_model("shvit_s2", num_classes, **kwargs)


def shvit_s3(num_classes: int = 1000, **kwargs: Any) -> SHViT:
    return create_model("shvit_s3", num_classes, **kwargs)


def shvit_s4(num_classes: int = 1000, **kwargs: Any) -> SHViT:
    return create_model("shvit_s4", num_classes, **kwargs)
