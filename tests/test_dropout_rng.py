"""The random stream: Philox known answers, bit-identity of kernels and reference, generator
semantics, and statistics of the keep decisions."""

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import fastreg
import fastreg.functional as F
from fastreg.reference import dropout as ref
from fastreg.reference.philox import philox4x32_10
from fastreg.testing import mismatch

from .helpers import DEVICES, FLOAT_DTYPES, kernel_available, require_kernel

# Published known-answer vectors of Philox4x32-10 (Random123 kat_vectors).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_reference_philox_matches_known_answers(counter, key, expected):
    words = philox4x32_10([torch.tensor([c], dtype=torch.int64) for c in counter], key)
    assert tuple(int(w) for w in words) == expected


def rng_state(seed, offset, device):
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 4099])
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_kernel_is_bit_identical_to_reference(device, dtype, n, mode):
    require_kernel(device)
    x = torch.randn(n, device=device).to(dtype)
    state = rng_state(0x1234_5678_9ABC, 3, device)
    out, mask = torch.ops.fastreg.dropout_seeded(x, 0.3, state, mode)
    ref_out, ref_mask = ref.dropout_seeded(x, 0.3, state, mode)
    assert torch.equal(out, ref_out)
    assert torch.equal(mask, ref_mask)
    grad = torch.randn(n, device=device).to(dtype)
    assert torch.equal(
        torch.ops.fastreg.dropout_backward(grad, mask, state, 0.3, mode),
        ref.dropout_backward(grad, ref_mask, state, 0.3, mode),
    )


def special_values(dtype, n=4099):
    """NaN, infinities, signed zeros, subnormals, the largest finite values (which overflow
    once scaled) and values whose scaled product is a rounding tie, among ordinary ones."""
    info = torch.finfo(dtype)
    specials = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, info.tiny / 4, -info.tiny / 2]
    specials += [info.max, -info.max, info.max / 1.25, 1 + info.eps, 1 + 1.5 * info.eps, -(1 + 2.5 * info.eps)]
    x = torch.randn(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x[:: len(specials) + 1] = 1.0
    for k, v in enumerate(specials):
        x[k + 1 :: len(specials) + 1] = v
    return x.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("p", [0.2, 0.5])
def test_kernel_rounds_special_values_like_the_reference(device, dtype, p):
    # Every lane of the vector paths sees each kind of value. A dropped NaN stays NaN and a
    # dropped inf becomes NaN (x * 0), as in torch.
    require_kernel(device)
    x = special_values(dtype).to(device)
    state = rng_state(99, 5, device)
    out = torch.ops.fastreg.dropout_seeded(x, p, state, 0)[0]
    assert mismatch(out, ref.dropout_seeded(x, p, state, 0)[0], exact=True) is None
    no_mask = torch.empty(0, dtype=torch.uint8, device=device)
    grad = torch.ops.fastreg.dropout_backward(x, no_mask, state, p, 0)
    assert mismatch(grad, ref.dropout_backward(x, no_mask, state, p, 0), exact=True) is None
    in_place = x.clone()
    drawn = torch.ops.fastreg.dropout_(in_place, p, 0, torch.Generator(device=device).manual_seed(1))[1]
    assert mismatch(in_place, ref.dropout_seeded(x, p, drawn, 0)[0], exact=True) is None


def rounding_boundary_cases(dtype, limit=64):
    """(threshold, values) pairs where value * keep_scale(threshold), computed in fp32 as the
    kernels do, lands on or next to a rounding boundary of the 16-bit dtype (a tie, or one unit
    of fp32 either side). Random inputs almost never get there: a 16-bit dtype has only 2^7
    (bf16) or 2^10 (fp16) significands, so few distinct products exist per scale."""
    mantissa_bits = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    dropped = 23 - mantissa_bits  # fp32 bits below the 16-bit dtype's last place, for normal results
    half = 1 << (dropped - 1)
    values = torch.arange(1 << mantissa_bits, dtype=torch.float32) / (1 << mantissa_bits) + 1  # [1, 2)
    cases = []
    for first in range(ref.RESOLUTION // 2, ref.RESOLUTION, 4096):  # p in (0, 0.5]: products in [1, 4)
        thresholds = torch.arange(first, first + 4096)
        scales = torch.tensor([ref.keep_scale(int(t)) for t in thresholds], dtype=torch.float64).float()
        low = (scales[:, None] * values[None, :]).view(torch.int32) & ((1 << dropped) - 1)
        hits = ((low - half).abs() <= 1).nonzero()
        for t_index, v_index in hits.tolist():
            cases.append((int(thresholds[t_index]), float(values[v_index])))
    by_threshold = {}
    for t, v in cases:
        by_threshold.setdefault(t, []).append(v)
    return sorted(by_threshold.items())[:: max(1, len(by_threshold) // limit)][:limit]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_rounds_products_at_rounding_boundaries_like_the_reference(device, dtype):
    require_kernel(device)
    cases = rounding_boundary_cases(dtype)
    assert len(cases) >= 32, "the search must find boundary products to test"
    for threshold, values in cases:
        p = 1.0 - threshold / ref.RESOLUTION
        assert ref.keep_threshold(p) == threshold
        x = torch.tensor(values, dtype=torch.float32).to(dtype)
        x = torch.cat([x, -x]).repeat(16).to(device)  # 32 copies each: some are kept
        state = rng_state(threshold, 1, device)
        out = torch.ops.fastreg.dropout_seeded(x, p, state, 0)[0]
        assert mismatch(out, ref.dropout_seeded(x, p, state, 0)[0], exact=True) is None, f"threshold {threshold}"


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), *DEVICES[1:]])
def test_tensors_past_2_to_the_31_elements_are_indexed_in_64_bits(device):
    # 2^31 + 21 fp16 elements (4 GB): element and group indices past int32 must follow the spec.
    require_kernel(device)
    n = (1 << 31) + 21
    if device == "cuda" and torch.cuda.get_device_properties(0).total_memory < 10 * n:
        pytest.skip("needs about 9 GB of GPU memory")
    x = torch.ones(n, dtype=torch.float16, device=device)
    out, bits = torch.ops.fastreg.dropout_seeded(x, 0.5, rng_state(77, 9, device), ref.BITS)
    del x
    last = (n - 1) // ref.GROUP
    groups = torch.tensor([0, (1 << 28) - 1, 1 << 28, (1 << 28) + 1, last - 1, last], dtype=torch.int64)
    keep = ref.keep_groups(groups, 0.5, 77, 9)
    keep[-1, n - last * ref.GROUP :] = False  # past the end: no element, bit 0
    assert torch.equal(bits[groups.to(device)].cpu(), ref.pack_bits(keep.reshape(-1)))
    elements = (groups[:, None] * ref.GROUP + torch.arange(ref.GROUP)).reshape(-1)[: -(ref.GROUP - n % ref.GROUP)]
    expected = keep.reshape(-1)[: elements.numel()].to(torch.float16) * 2
    assert torch.equal(out[elements.to(device)].cpu(), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cpu_and_cuda_kernels_give_the_same_masks(dtype):
    assert kernel_available("cuda") and kernel_available("cpu")
    x = torch.randn(3, 1000, 17).to(dtype)
    cpu = torch.ops.fastreg.dropout_seeded(x, 0.4, rng_state(99, 12, "cpu"), 1)
    cuda = torch.ops.fastreg.dropout_seeded(x.cuda(), 0.4, rng_state(99, 12, "cuda"), 1)
    assert torch.equal(cpu[1], cuda[1].cpu())
    assert torch.equal(cpu[0], cuda[0].cpu())


def _lanes(group, offset, key):
    counter = [torch.tensor([group]), torch.tensor([0]), torch.tensor([offset]), torch.tensor([0])]
    return [half for w in philox4x32_10(counter, key) for half in (int(w) & 0xFFFF, int(w) >> 16)]


def test_philox_lanes_follow_the_spec():
    # Element 8g+j keeps iff lane j of Philox(counter=(g, 0, offset, 0), key=seed ^ "fastreg\0")
    # is below the threshold; the tag's words are written out here.
    seed, offset, p = 77, 5, 0.5
    keep = ref.keep_flat(16, p, seed, offset)
    lanes = _lanes(1, offset, (seed ^ 0x74736166, 0x00676572))
    assert keep[8:16].tolist() == [lane < ref.keep_threshold(p) for lane in lanes]


def test_keys_are_apart_from_torchs_cuda_random_ops():
    # torch's CUDA ops draw Philox(counter=(offset/4 + k, 0, thread, 0), key=seed): untagged, our
    # group g at offset o would repeat torch's thread o. The decisions must not be those lanes.
    seed, offset, p = 1234, 8, 0.5
    keep = ref.keep_flat(8 * 256, p, seed, offset).view(256, 8)
    untagged = torch.tensor(
        [[lane < ref.keep_threshold(p) for lane in _lanes(g, offset, (seed, 0))] for g in range(256)]
    )
    assert (keep == untagged).all(dim=1).sum() < 256 // 20  # equal groups: about 1 in 256 by chance


@pytest.mark.parametrize("device", DEVICES)
def test_manual_seed_reproduces_and_consecutive_calls_differ(device):
    x = torch.ones(4096, device=device)
    torch.manual_seed(1)
    a, b = F.dropout(x, 0.5), F.dropout(x, 0.5)
    torch.manual_seed(1)
    a2 = F.dropout(x, 0.5)
    assert torch.equal(a, a2)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_fork_rng_and_explicit_generator(device):
    x = torch.ones(4096, device=device)
    with torch.random.fork_rng(devices=[0] if device == "cuda" else []):
        inside = F.dropout(x, 0.5)
    after = F.dropout(x, 0.5)
    assert torch.equal(inside, after), "fork_rng must restore the generator state"
    g1, g2 = torch.Generator(device=device).manual_seed(5), torch.Generator(device=device).manual_seed(5)
    assert torch.equal(F.dropout(x, 0.5, generator=g1), F.dropout(x, 0.5, generator=g2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_same_masks(device, use_reentrant):
    # torch.utils.checkpoint saves the RNG state and restores it before recomputing the forward
    # in backward: the recomputed masks must be the forward's, or the gradients are wrong.
    torch.manual_seed(0)
    block = torch.nn.Sequential(
        torch.nn.Linear(16, 16), fastreg.Dropout(0.5), torch.nn.ReLU(), fastreg.Dropout(0.3, mask_mode="bits")
    ).to(device)
    x = torch.randn(8, 16, device=device, requires_grad=True)

    def step(checkpointed):
        torch.manual_seed(123)
        block.zero_grad()
        x.grad = None
        y = checkpoint(block, x, use_reentrant=use_reentrant) if checkpointed else block(x)
        y.pow(2).sum().backward()
        return y.detach(), x.grad.clone(), block[0].weight.grad.clone()

    for plain, checkpointed in zip(step(False), step(True)):
        assert torch.equal(plain, checkpointed)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_draws_rng_state_like_the_reference(device):
    require_kernel(device)
    x = torch.randn(100, device=device)
    torch.manual_seed(3)
    out, _, state = torch.ops.fastreg.dropout(x, 0.5, 0)
    after = torch.rand(4, device=device)
    torch.manual_seed(3)
    ref_out, _, ref_state = ref.dropout(x, 0.5, 0)
    assert torch.equal(state, ref_state) and torch.equal(out, ref_out)
    assert torch.equal(torch.rand(4, device=device), after), "the draws must advance the generator alike"
    for seed in range(20):  # explicit generators, and seeds whose draws differ in their high bits
        kernel_gen, ref_gen = (torch.Generator(device=device).manual_seed(seed) for _ in range(2))
        kernel_draws = [torch.ops.fastreg.dropout(x, 0.5, 0, kernel_gen)[2] for _ in range(3)]
        ref_draws = [ref.dropout(x, 0.5, 0, ref_gen)[2] for _ in range(3)]
        assert all(torch.equal(k, r) for k, r in zip(kernel_draws, ref_draws)), seed
        assert torch.equal(kernel_gen.get_state(), ref_gen.get_state())


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_rate_within_binomial_interval(p):
    n = 1 << 20
    torch.manual_seed(0)
    dropped = int((F.dropout(torch.ones(n), p) == 0).sum())
    q = 1.0 - ref.keep_threshold(p) / ref.RESOLUTION
    sigma = math.sqrt(n * q * (1 - q))
    assert abs(dropped - n * q) < 5 * sigma


def test_expected_value_is_preserved_exactly():
    # scale is 1 / (quantized keep probability): keep probability * scale == 1 up to rounding.
    for p in [0.1, 0.3, 1 / 3, 0.5, 0.77]:
        t = ref.keep_threshold(p)
        assert abs(ref.keep_scale(t) * t / ref.RESOLUTION - 1.0) < 1e-15
    torch.manual_seed(0)
    mean = F.dropout(torch.ones(1 << 22, dtype=torch.float64), 0.3).mean().item()
    assert abs(mean - 1.0) < 5 * math.sqrt(0.3 / 0.7 / (1 << 22))


def test_neighbours_and_consecutive_calls_are_uncorrelated():
    n = 1 << 20
    torch.manual_seed(0)
    a = (F.dropout(torch.ones(n), 0.5) != 0).float()
    b = (F.dropout(torch.ones(n), 0.5) != 0).float()
    bound = 5 / math.sqrt(n)
    for lag in (1, 2, 7, 8, 9, 64):
        assert abs(torch.corrcoef(torch.stack([a[:-lag], a[lag:]]))[0, 1]) < bound, f"lag {lag}"
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < bound


@pytest.mark.parametrize("device", DEVICES)
def test_different_seeds_and_offsets_give_different_masks(device):
    x = torch.ones(4096, device=device)
    masks = {
        (s, o): torch.ops.fastreg.dropout_seeded(x, 0.5, rng_state(s, o, device), 1)[1].cpu()
        for s in (0, 1, 2**40)
        for o in (0, 4, 2**33)
    }
    keys = list(masks)
    for i, k in enumerate(keys):
        for other in keys[i + 1 :]:
            assert not torch.equal(masks[k], masks[other]), (k, other)
