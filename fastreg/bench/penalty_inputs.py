"""Parameter lists shaped like real models, for the weight-penalty benchmark: ResNet-50's and
GPT-2 small's on a GPU, a smaller list for CPUs, and ResNet-50's count of one-element tensors
for the host cost per step. Values ~ N(0, 0.02^2), reproducible from a seed."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def resnet50_shapes() -> list[tuple[int, ...]]:
    """torchvision's ResNet-50: 161 tensors, 25,557,032 elements (bottleneck blocks [3, 4, 6, 3])."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]  # stem conv + batch norm
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            width = planes * 4
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,)]
            shapes += [(planes, planes, 3, 3), (planes,), (planes,)]
            shapes += [(width, planes, 1, 1), (width,), (width,)]
            if block == 0:  # downsample: 1x1 conv + batch norm
                shapes += [(width, inplanes, 1, 1), (width,), (width,)]
            inplanes = width
    return shapes + [(1000, 2048), (1000,)]


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """Hugging Face GPT-2 small (lm_head tied to wte): 148 tensors, 124,439,808 elements."""
    d, vocab, context, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (context, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]  # ln_1, attn.c_attn, attn.c_proj
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp.c_fc, mlp.c_proj
    return shapes + [(d,), (d,)]  # ln_f


def resnet50_host_shapes() -> list[tuple[int, ...]]:
    """ResNet-50's 161 tensors with one element each: what an implementation costs the host per
    step, apart from moving memory (on a GPU, whether the host can keep ahead of the kernels)."""
    return [(1,)] * len(resnet50_shapes())


def small_cpu_shapes() -> list[tuple[int, ...]]:
    """80 tensors, about 10M elements: 40 (weight, bias) pairs with odd sizes, for CPU benchmarks."""
    shapes: list[tuple[int, ...]] = []
    for i in range(40):
        out_features, in_features = 300 + 7 * (i % 9), 800 + 3 * (i % 11)
        shapes += [(out_features, in_features), (out_features,)]
    return shapes


def make_params(
    shapes: Iterable[tuple[int, ...]],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    grads: bool = False,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Leaf tensors (requires_grad) with the given shapes, values ~ N(0, 0.02^2); with
    ``grads=True`` each also gets a random ``.grad``, so in-place timings allocate nothing."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = (torch.randn(shape, generator=generator) * 0.02).to(device=device, dtype=dtype).requires_grad_()
        if grads:
            p.grad = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
        params.append(p)
    return params


def resnet50_like_params(device="cpu", dtype=torch.float32, **kwargs) -> list[torch.Tensor]:
    return make_params(resnet50_shapes(), device, dtype, **kwargs)


def resnet50_host_params(device="cpu", dtype=torch.float32, **kwargs) -> list[torch.Tensor]:
    return make_params(resnet50_host_shapes(), device, dtype, **kwargs)


def gpt2_small_like_params(device="cpu", dtype=torch.float32, **kwargs) -> list[torch.Tensor]:
    return make_params(gpt2_small_shapes(), device, dtype, **kwargs)


def small_cpu_params(device="cpu", dtype=torch.float32, **kwargs) -> list[torch.Tensor]:
    return make_params(small_cpu_shapes(), device, dtype, **kwargs)
