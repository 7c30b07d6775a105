"""The fast path's LoRA kernel (engine/ckernel.py): the C code against torch, on both of its code
paths (AVX2 and the portable loops), the torch path for prompts, the fast decoder with it against
PEFT, and every way it can be missing (no compiler, turned off, a failed check, a damaged cache)."""

import shutil

import pytest
import torch

from shammah.engine import ckernel

needs_cc = pytest.mark.skipif(
    not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")), reason="no C compiler"
)


def _site(g, k=40, r=4, sizes=(24, 8, 13)):
    a = [torch.randn(r, k, generator=g) for _ in sizes]
    b = [torch.randn(n, r, generator=g) * 0.1 for n in sizes]
    return a, b


def _want(x, y, a, b):
    return y + torch.cat([(x @ ai.t()) @ bi.t() for ai, bi in zip(a, b, strict=True)], -1)


@needs_cc
@pytest.mark.parametrize("extra", [(), ("-DSHAMMAH_GENERIC",)], ids=["native", "portable"])
def test_the_kernel_adds_the_lora_as_torch_does(tmp_path, extra):
    kernel, why = ckernel.load(tmp_path, extra)
    assert kernel is not None, why
    g = torch.Generator().manual_seed(1)
    a, b = _site(g)
    site = kernel.site(a, b)
    for t in (1, 3, ckernel.ROWS_IN_C + 4):  # decode, a few rows in C, a prompt through torch
        wide = torch.randn(t, 80, generator=g)
        x = wide[:, :40]  # strided rows, as the fast path's RMSNorm output is
        y = torch.randn(t, 45, generator=g)
        want = _want(x, y, a, b)
        lora = want - y
        site.add(x, y)
        # bf16 weights: ~0.3% of what the LoRA adds (rounding A and B)
        assert (y - want).norm() < 0.01 * lora.norm(), ((y - want).norm() / lora.norm(), t)
    # a broken kernel would be caught: the same check on a sum 5% off fails
    assert (y - want + 0.05 * lora).norm() > 0.01 * lora.norm()


@needs_cc
def test_the_kernel_is_compiled_once_and_a_damaged_one_is_rebuilt(tmp_path):
    kernel, _ = ckernel.load(tmp_path)
    built = kernel.path.stat().st_mtime_ns
    again, _ = ckernel.load(tmp_path)
    assert again.path == kernel.path and again.path.stat().st_mtime_ns == built
    damaged = tmp_path / "other" / "kernels" / kernel.path.name  # a copy cut short (a full disk)
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(kernel.path.read_bytes()[:1000])
    shutil.copy(kernel.path.with_suffix(".sha256"), damaged.with_suffix(".sha256"))
    fixed, why = ckernel.load(tmp_path / "other")
    assert fixed is not None, why
    assert fixed.path == damaged and damaged.read_bytes() == kernel.path.read_bytes()


def test_without_a_compiler_or_when_turned_off_it_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "/bin/false")
    kernel, why = ckernel.load(tmp_path)
    assert kernel is None and why.startswith("the LoRA kernel did not compile (/bin/false")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    kernel, why = ckernel.load(tmp_path / "other")
    assert kernel is None and "could not be built" in why
    monkeypatch.setenv("SHAMMAH_LORA_KERNEL", "off")
    assert ckernel.load(tmp_path) == (None, "SHAMMAH_LORA_KERNEL=off")
    assert ckernel.load(None)[0] is None


@needs_cc
def test_a_kernel_that_computes_wrong_is_not_used(tmp_path, monkeypatch):
    # every part's B taking the first part's z: the indexing slip the check must catch
    broken = ckernel.SOURCE.replace("z[p * s->r + q]", "z[q]")
    assert broken != ckernel.SOURCE
    monkeypatch.setattr(ckernel, "SOURCE", broken)
    kernel, why = ckernel.load(tmp_path)
    assert kernel is None and "disagrees with torch" in why


@needs_cc
def test_the_c_int4_matmul_follows_the_int4_weights(tmp_path):
    """shammah_q4 (the int4 matmul, x in two int8 passes per 16 values) against the same int4 weights in
    fp32: within the rounding of x, with bias, strided rows, and in place; for decode's one row
    and a prompt's many (tiles of 4 rows and the rest)."""
    kernel, why = ckernel.load(tmp_path)
    if kernel is None or not kernel.has_q4:
        pytest.skip(why or "no integer SIMD for it on this CPU")
    g = torch.Generator().manual_seed(2)
    n, k = 96, 576
    groups = torch.randn(n, k // 32, 32, generator=g)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = (hi - lo) / 15
    q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15)
    w = (q * scale[..., None] + lo[..., None]).reshape(n, k)
    bias = torch.randn(n, generator=g)
    c = kernel.q4(q.reshape(n, k), scale, lo, bias)
    x = torch.randn(11, 2 * k, generator=g)[:, :k]
    want = x @ w.t() + bias
    got = c.mm(x)
    err = ((got - want).norm() / want.norm()).item()
    # x in two int8 passes per 16 values: what is left is the fp16 scales and mins (~0.05%); one
    # pass was ~1.2% here, bf16 activations ~0.3%
    assert err < 2e-3, err
    for i in (0, 5, 10):  # a row of a tile, and the last (alone) are what one row alone gives
        assert torch.allclose(c.mm(x[i : i + 1]), got[i : i + 1], atol=1e-4)
    out = torch.randn(11, n, generator=g)
    before = out.clone()
    c.add(x, out)
    assert torch.allclose(out - before, c.mm(x), atol=1e-4)
    assert kernel.q4(q.reshape(n, k)[:-4], scale[:-4], lo[:-4], None) is None  # rows in blocks of 8
    # the nibble order is what the kernel reads: swapped halves would be caught
    swapped = kernel.q4(torch.cat([q[..., 16:], q[..., :16]], -1).reshape(n, k), scale, lo, bias)
    assert ((swapped.mm(x) - want).norm() / want.norm()).item() > 0.1


@needs_cc
def test_a_c_int4_matmul_that_computes_wrong_is_not_used(tmp_path, monkeypatch):
    """The int4 check at load: a kernel reading the nibbles in the wrong order keeps the LoRA
    kernel and leaves decode's int4 matmuls to torch."""
    broken = ckernel.SOURCE.replace("hi[c] = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4)", "hi[c] = lo[c]")
    if broken == ckernel.SOURCE:
        pytest.skip("this source has no AVX2 int4 kernel")
    monkeypatch.setattr(ckernel, "SOURCE", broken)
    kernel, why = ckernel.load(tmp_path)
    assert kernel is not None and why == "" and not kernel.has_q4
