"""StackedModel: K members of one architecture as one batched model (parameters and buffers [K, ...]).

torch.func.stack_module_state + functional_call of one template: on a GPU the member dimension is vmapped, so a
Linear becomes a batched matrix product, for every architecture regbench builds (MLP, lecture CNN, ResNet) without a
hand-written stacked layer per module type; on a CPU (and for convolutions) the members run one by one over views of
the stacked leaves, each by its single run's own kernels, so bitwise as its single run (``loop``, below). BatchNorm
keeps per-member running statistics (its buffers are stacked and updated in place). Dropout layers are replaced in
the template by a layer that multiplies by noise drawn outside the model's call, per member, exactly as the member's
own layer draws it (``dropout_noise``), so masks come from the member's own RNG stream and its own rate.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call, vmap

from regbench.models.common import dropout_mask

_DROPOUTS = (nn.Dropout, nn.Dropout2d)


class _NoiseDropout(nn.Module):
    """Train mode: x · noise (the member's mask, scaled by 1/(1−p)); eval mode: identity."""

    def __init__(self):
        super().__init__()
        self.register_buffer("noise", torch.ones(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.noise if self.training else x


def _dropouts(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _DROPOUTS)]


# torch's layers that draw randomness the stack does not reproduce per member (nn.Dropout / Dropout2d it does); a
# layer of regbench's own says so itself with a ``stack_refusal`` class attribute (models.common.DropPath).
_UNSTACKABLE = (nn.AlphaDropout, nn.Dropout1d, nn.Dropout3d, nn.FeatureAlphaDropout)


def _check_randomness(model: nn.Module) -> None:
    for name, m in model.named_modules():
        why = getattr(type(m), "stack_refusal", None)
        if why or isinstance(m, _UNSTACKABLE):
            raise ValueError(f"layer {name} ({type(m).__name__}) draws randomness a stack cannot reproduce per member"
                             + (f": {why}" if why else ""))


class StackedModel:
    def __init__(self, members: list[nn.Module], input_shape: Optional[tuple[int, ...]] = None):
        if not members:
            raise ValueError("a stack needs at least one member")
        for m in members:
            _check_randomness(m)
        self.members = list(members)
        counts = [len(_dropouts(m)) for m in members]
        template_src = members[max(range(len(members)), key=lambda k: counts[k])]
        kinds = [type(d) for d in _dropouts(template_src)]
        for k, m in enumerate(members):
            if counts[k] and [type(d) for d in _dropouts(m)] != kinds:
                raise ValueError(f"member {k} has other dropout layers than member 0 ({counts[k]} vs {len(kinds)})")
        self.rates = [[d.p for d in _dropouts(m)] if counts[k] else [0.0] * len(kinds)
                      for k, m in enumerate(members)]
        self.kinds = kinds
        self.template = copy.deepcopy(template_src)
        self._replace_dropouts(self.template)
        self.noise_names = [f"{n}.noise" for n, mod in self.template.named_modules() if isinstance(mod, _NoiseDropout)]
        self.param_names = [n for n, p in self.template.named_parameters() if p.requires_grad]
        self.buffer_names = [n for n, _ in self.template.named_buffers() if not n.endswith(".noise")]
        self._check_shapes()
        self.params = [torch.stack([ps[i].detach() for ps in self._member_params_all()]).requires_grad_()
                       for i in range(len(self.param_names))]
        self.buffers = [torch.stack([bs[i].detach() for bs in self._member_buffers_all()])
                        for i in range(len(self.buffer_names))]
        self.template.to("meta")
        # Member by member over views of the stacked leaves (unbind: one gradient op per leaf; still one step, one
        # optimizer call, one epoch end for all): on a CPU always, on a GPU for convolutions. On a CPU each member
        # then runs its single run's very kernels (addmm per Linear...), so its gradients are bitwise its single
        # run's; vmap's batched ones are not (bmm then a bias add rounds otherwise than addmm, and with 2 threads MKL
        # splits a bmm otherwise than a mm): one ulp per step, which Adam's ε turns into lr-sized steps of
        # near-zero gradients — 7e-3 relative by epoch 5 for one seed of the default experiment (issue 25). It is
        # also faster on a CPU (docs/benchmarks.md, issue 25: 16 default MLPs 23 vs 31 ms of CPU per step), and
        # for convolutions far faster: vmap makes one grouped convolution, which CPU kernels run far slower (a
        # 4-member lecture CNN epoch 7–10 s vs about 1 s per member).
        self.loop = self.params[0].device.type == "cpu" or \
            any(isinstance(m, nn.modules.conv._ConvNd) for m in self.template.modules())
        self.training = True
        self.shapes = self._probe(input_shape) if kinds else []

    # ------------------------------------------------------------------------------------ structure
    @staticmethod
    def _replace_dropouts(model: nn.Module) -> None:
        for name, child in list(model.named_children()):
            if isinstance(child, _DROPOUTS):
                setattr(model, name, _NoiseDropout())
            else:
                StackedModel._replace_dropouts(child)

    def _own_params(self, m: nn.Module) -> list[nn.Parameter]:
        return [p for p in m.parameters() if p.requires_grad]

    def _own_buffers(self, m: nn.Module) -> list[torch.Tensor]:
        return list(m.buffers())

    def _member_params_all(self):
        return [self._own_params(m) for m in self.members]

    def _member_buffers_all(self):
        return [self._own_buffers(m) for m in self.members]

    def _check_shapes(self) -> None:
        tp = [p.shape for n, p in self.template.named_parameters() if p.requires_grad]
        tb = [b.shape for n, b in self.template.named_buffers() if not n.endswith(".noise")]
        for k, m in enumerate(self.members):
            mp, mb = [p.shape for p in self._own_params(m)], [b.shape for b in self._own_buffers(m)]
            if mp != tp or mb != tb:
                raise ValueError(f"member {k} has another architecture than the stack's (parameter or buffer shapes "
                                 "differ)")

    def _probe(self, input_shape) -> list[tuple[int, ...]]:
        """Per dropout layer, the shape of one sample's noise (Dropout: the input's; Dropout2d: [C, 1, 1])."""
        if input_shape is None:
            raise ValueError("a stack with dropout needs the input shape")
        src = copy.deepcopy(self.members[0]).cpu().eval()
        layers = _dropouts(src)
        if not layers:  # member 0 has none: probe one that has them
            src = copy.deepcopy(next(m for m in self.members if _dropouts(m))).cpu().eval()
            layers = _dropouts(src)
        shapes: dict[int, tuple] = {}
        hooks = [d.register_forward_hook(lambda mod, inp, out, i=i: shapes.__setitem__(i, tuple(inp[0].shape[1:])))
                 for i, d in enumerate(layers)]
        with torch.no_grad():
            src(torch.zeros(2, *input_shape))
        for h in hooks:
            h.remove()
        return [(s[0], *[1] * (len(s) - 1)) if kind is nn.Dropout2d else s
                for s, kind in zip((shapes[i] for i in range(len(layers))), self.kinds)]

    @property
    def K(self) -> int:
        return len(self.members)

    def member_params(self, k: int) -> list[nn.Parameter]:
        return self._own_params(self.members[k])

    # ------------------------------------------------------------------------------------ forward
    def train(self, mode: bool = True) -> "StackedModel":
        self.training = mode
        self.template.train(mode)
        return self

    def eval(self) -> "StackedModel":
        return self.train(False)

    def dropout_noise(self, k: int, batch_size: int) -> list[torch.Tensor]:
        """Member k's masks for one step, from torch's global RNG, as its own layers draw them in its forward:
        torch's dropout draws ``empty_like(x).bernoulli_(1 − p)`` and divides by 1 − p (Dropout2d: one value per
        sample and channel); nothing when p = 0."""
        device = self.params[0].device
        out = []
        for rate, shape in zip(self.rates[k], self.shapes):
            if rate == 0:
                out.append(torch.ones((batch_size, *shape), device=device))
            else:
                out.append(dropout_mask((batch_size, *shape), rate, device))
        return out

    def _call(self, params, buffers, noise, x):
        state = dict(zip(self.param_names, params))
        state.update(zip(self.buffer_names, buffers))
        state.update(zip(self.noise_names, noise))
        return functional_call(self.template, state, (x,))

    def __call__(self, x: torch.Tensor, noise: Optional[list[list[torch.Tensor]]] = None) -> torch.Tensor:
        """Logits [K, B, C] of the members' batches x [K, B, ...]; in train mode with their dropout noise."""
        if self.loop:
            return self._loop(x, noise if self.shapes and self.training else None)
        if self.shapes and self.training:
            stacked_noise = [torch.stack([n[i] for n in noise]) for i in range(len(self.shapes))]
        else:
            stacked_noise = [torch.ones(self.K, device=x.device) for _ in self.noise_names]
        return vmap(self._call, randomness="error")(self.params, self.buffers, stacked_noise, x)

    def _loop(self, x: torch.Tensor, noise: Optional[list[list[torch.Tensor]]], shared: bool = False) -> torch.Tensor:
        params = [p.unbind(0) for p in self.params]
        buffers = [b.unbind(0) for b in self.buffers]
        one = torch.ones((), device=x.device)
        outs = []
        for k in range(self.K):
            layers = noise[k] if noise is not None else [one] * len(self.noise_names)
            outs.append(self._call([p[k] for p in params], [b[k] for b in buffers], layers, x if shared else x[k]))
        return torch.stack(outs)

    def evaluate(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Eval-mode logits [K, N, C] of one input x [N, ...] shared by every member, in batches, without autograd."""
        was = self.training
        self.eval()
        ones = [torch.ones(self.K, device=x.device) for _ in self.noise_names]
        try:
            with torch.no_grad():
                if self.loop:
                    return torch.cat([self._loop(x[i:i + batch_size], None, shared=True)
                                      for i in range(0, len(x), batch_size)], dim=1)
                fn = vmap(self._call, in_dims=(0, 0, 0, None), randomness="error")
                return torch.cat([fn(self.params, self.buffers, ones, x[i:i + batch_size])
                                  for i in range(0, len(x), batch_size)], dim=1)
        finally:
            self.train(was)

    # ------------------------------------------------------------------------------------ members
    @torch.no_grad()
    def export_member(self, k: int) -> None:
        for p, s in zip(self.member_params(k), self.params):
            p.copy_(s[k])
        for b, s in zip(self._own_buffers(self.members[k]), self.buffers):
            b.copy_(s[k])

    @torch.no_grad()
    def import_member(self, k: int) -> None:
        for p, s in zip(self.member_params(k), self.params):
            s[k].copy_(p)
        for b, s in zip(self._own_buffers(self.members[k]), self.buffers):
            s[k].copy_(b)

    def select(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, device=self.params[0].device)
        self.params = [p.detach()[idx].clone().requires_grad_() for p in self.params]
        self.buffers = [b[idx].clone() for b in self.buffers]
        self.members = [self.members[k] for k in keep]
        self.rates = [self.rates[k] for k in keep]
