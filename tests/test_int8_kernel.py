"""llmcore's int8 kernel (csrc/int8_linear.cpp): built here, exact to its 15-bit activations, each
instruction-set path checked, and the PyTorch fallback when it cannot be built."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmcore import int8_kernel
from llmcore.generate import generate
from llmcore.quantize import Int8Linear, quantize_int8_weight_only

ROOT = Path(__file__).resolve().parents[1]
X86 = platform.machine() in ("x86_64", "AMD64")

# (out, in, rows, bias): rows past a 16-row block and columns past a multiple of 4, a row longer
# than one int32 accumulation block (512 columns), rows in groups of 4 and a remainder, and for
# 1 and 2 rows (unrolled 4 and 2 loads a step) column counts that leave a remainder of loads.
SHAPES = [
    (37, 100, 1, True),
    (5, 3, 1, False),
    (20, 1030, 1, False),
    (50, 500, 2, True),
    (768, 3072, 3, False),
    (33, 5000, 16, True),
    (64, 1030, 131, True),
]


def reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ (w.double() * scale.double()[:, None]).T
    return y if bias is None else y + bias.double()


def case(out_f: int, in_f: int, rows: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8, generator=g)
    scale = torch.rand(out_f, generator=g) / 50
    b = torch.randn(out_f, generator=g) if bias else None
    x = torch.randn(rows, in_f, generator=g) * 4
    x[0, 0] = 30.0  # an outlier: the row's scale follows it
    return x, w, scale, b


def test_the_kernel_builds_here_with_a_vector_instruction_set() -> None:
    if not (X86 and platform.system() == "Linux" and shutil.which("c++") and shutil.which("ninja")):
        pytest.skip("the kernel is built on x86-64 Linux with a C++ compiler and ninja")
    assert int8_kernel.available(), "llmcore's int8 kernel did not build on this machine"
    assert int8_kernel.isa() in ("avx512_vnni", "avx2")


def test_pack_and_unpack_round_trip_with_zero_padding() -> None:
    w = torch.randint(-127, 128, (37, 10), dtype=torch.int8)
    packed = int8_kernel.pack(w)
    assert packed.shape == (3, 6, 16, 2)  # 48 rows, 12 columns
    assert torch.equal(int8_kernel.unpack(packed, 37, 10), w)
    assert int(packed.transpose(1, 2).reshape(48, 12)[37:].abs().sum()) == 0
    assert torch.equal(packed[1, 2, 3], w[19, 4:6])  # [b, p, j, t] = W[16b + j, 2p + t]


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_float64_to_its_activation_precision(shape) -> None:
    if not int8_kernel.available():
        pytest.skip("the int8 kernel is not built on this machine")
    x, w, scale, bias = case(*shape)
    y = int8_kernel.int8_linear(x, int8_kernel.pack(w), scale, bias)
    ref = reference(x, w, scale, bias)
    # 15-bit activations: each product is off by at most half a step of its row's max |x|.
    half_step = x.abs().amax(dim=1, keepdim=True).double() / 32767 / 2  # per row of x
    bound = half_step * (w.double().abs().sum(dim=1) * scale.double())[None, :]
    assert ((y.double() - ref).abs() <= bound + 1e-5).all()
    assert y.shape == (shape[2], shape[0]) and y.dtype == torch.float32
    # Leading dimensions are kept; a non-contiguous x gives the same values.
    x3 = x.T.contiguous().T.reshape(1, *x.shape)
    assert torch.equal(int8_kernel.int8_linear(x3, int8_kernel.pack(w), scale, bias)[0], y)


def test_kernel_rejects_bad_inputs_in_one_line() -> None:
    if not int8_kernel.available():
        pytest.skip("the int8 kernel is not built on this machine")
    x, w, scale, bias = case(16, 8, 1, True)
    packed = int8_kernel.pack(w)
    with pytest.raises(RuntimeError, match="x must be fp32"):
        int8_kernel.int8_linear(x.double(), packed, scale, bias)
    with pytest.raises(RuntimeError, match="x has 9 features and scale 16 outputs"):
        int8_kernel.int8_linear(torch.randn(1, 9), packed, scale, bias)
    with pytest.raises(RuntimeError, match="weights must be packed"):
        int8_kernel.int8_linear(x, w, scale, bias)


def without_the_kernel(monkeypatch) -> None:
    """Layers built from now on are built as on a machine where the kernel cannot be built."""
    monkeypatch.setattr(int8_kernel, "available", lambda: False)


def test_int8_linear_gives_the_same_product_with_and_without_the_kernel(monkeypatch) -> None:
    linear = torch.nn.Linear(100, 37)
    layer = Int8Linear(linear)
    without_the_kernel(monkeypatch)
    fallback = Int8Linear(linear)
    assert not fallback.kernel and fallback.weight_int8.shape == (37, 100)  # (out, in): no packing
    assert torch.equal(fallback.int8_weight(), layer.int8_weight())
    dequantized = layer.int8_weight().float() * layer.scale[:, None]
    for rows in (1, 5, 300):
        x = torch.randn(2, rows, 100)
        ref = torch.nn.functional.linear(x, dequantized, linear.bias.detach())
        with torch.no_grad():
            assert torch.allclose(layer(x), ref, atol=1e-4, rtol=1e-4)
            assert torch.allclose(fallback(x), ref, atol=1e-5, rtol=1e-5)


def test_compiled_decoding_without_the_kernel_matches_eager(monkeypatch) -> None:
    """The fallback's compiled one-row reduction (a machine where the kernel cannot be built)."""
    torch.manual_seed(0)
    from llmcore.config import GPTConfig
    from llmcore.model import GPTModel

    without_the_kernel(monkeypatch)
    model = quantize_int8_weight_only(GPTModel(GPTConfig.from_preset("cpu-tiny")))
    assert not any(layer.kernel for layer in model.modules() if isinstance(layer, Int8Linear))
    torch._dynamo.reset()
    prompt = [[5, 6, 7]]
    assert generate(model, prompt, 8, compile=True) == generate(model, prompt, 8)


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=600)


CHECK = """
import torch
from llmcore import int8_kernel
from tests.test_int8_kernel import SHAPES, case, reference
print(int8_kernel.isa())
for shape in SHAPES:
    x, w, scale, bias = case(*shape)
    y = int8_kernel.int8_linear(x, int8_kernel.pack(w), scale, bias).double()
    ref = reference(x, w, scale, bias)
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 1e-4, shape
from llmcore.fused_step import unsupported
from tests.test_fused_step import CONFIGS, check_against_eager, int8_model
for name in CONFIGS:  # the C++ decoding step (csrc/gpt_decode.cpp) where Int8Linear runs the kernel
    model = int8_model(name)
    assert (unsupported(model) is None) == int8_kernel.available()
    if int8_kernel.available():
        check_against_eager(model, [3, 1, 4], 8)
print("ok")
"""


@pytest.mark.parametrize(("march", "isa"), [("x86-64-v3", "avx2"), ("x86-64", "scalar")])
def test_each_instruction_set_path_computes_the_same_product(march: str, isa: str, tmp_path: Path) -> None:
    """The int8 product, and the decoding step built on it (tests/test_fused_step.py)."""
    if not int8_kernel.available() or not X86:
        pytest.skip("the int8 kernel is not built on this machine")
    done = run_python(CHECK, {"LLMCORE_INT8_MARCH": march, "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [isa, "ok"]


def test_switched_off_or_unbuildable_the_kernel_gives_way_to_pytorch(tmp_path: Path) -> None:
    code = (
        "import warnings; warnings.simplefilter('always')\n"
        "import torch\n"
        "from llmcore import int8_kernel\n"
        "from llmcore.quantize import Int8Linear\n"
        "layer = Int8Linear(torch.nn.Linear(8, 4))\n"
        "print(int8_kernel.available(), layer.kernel, tuple(layer(torch.randn(1, 8)).shape))\n"
    )
    off = run_python(code, {"LLMCORE_INT8_KERNEL": "0"})
    assert off.returncode == 0, off.stderr[-2000:]
    assert off.stdout.split() == ["False", "False", "(1,", "4)"] and "could not be built" not in off.stderr
    broken = run_python(code, {"CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert broken.returncode == 0, broken.stderr[-2000:]
    assert broken.stdout.split() == ["False", "False", "(1,", "4)"]
    assert "llmcore: the CPU kernels (llmcore/csrc) could not be built" in broken.stderr
    assert "Traceback" not in broken.stderr
