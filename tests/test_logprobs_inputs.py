"""Bad input raises ValueError/TypeError naming the argument; environment overrides are honoured.

Covers ``fused_linear_logprobs`` and ``sequence_logprobs``: tensor types, shapes, dtypes,
devices (the 'meta' device stands in for a second device), label ranges, temperature, softcap,
ignore_index, backend, chunk_bytes, cu_seqlens; and the env vars ``DFTKERN_BACKEND`` /
``DFTKERN_CHUNK_BYTES``.
"""

from __future__ import annotations

import pytest
import torch
from _reference import make_inputs, reference_token_logprobs, relative_error

from dftkern import fused_linear_logprobs, sequence_logprobs
from dftkern.engines import TorchRowEngine


@pytest.fixture
def inputs():
    """hidden [6, 8], weight [20, 8], labels [6], bias [20] (fp32)."""
    return make_inputs(6, 8, 20, seed=50, with_bias=True)


# ---------------------------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_label", [20, 10**6, -1, -101], ids=["V", "huge", "minus-1", "minus-101"])
def test_label_outside_vocab_raises_on_cpu(inputs, bad_label):
    hidden, weight, labels, _ = inputs
    labels = labels.clone()
    labels[3] = bad_label
    with pytest.raises(ValueError, match=r"labels\[3\].*outside \[0, V=20\)"):
        fused_linear_logprobs(hidden, weight, labels)
    with pytest.raises(ValueError, match="labels"):  # validate=False does not skip the (free) CPU check
        fused_linear_logprobs(hidden, weight, labels, validate=False)
    with pytest.raises(ValueError, match="labels"):
        sequence_logprobs(hidden.unsqueeze(0), weight, labels.unsqueeze(0))


def test_label_out_of_range_error_points_at_position_in_nd_labels(inputs):
    hidden, weight, _, _ = inputs
    labels = torch.zeros(2, 3, dtype=torch.long)
    labels[1, 2] = 25
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = 25"):
        fused_linear_logprobs(hidden.reshape(2, 3, 8), weight, labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool], ids=["float32", "float16", "bool"])
def test_non_integer_labels_raise_type_error(inputs, dtype):
    hidden, weight, labels, _ = inputs
    with pytest.raises(TypeError, match="labels"):
        fused_linear_logprobs(hidden, weight, labels.to(dtype))


def test_labels_not_a_tensor(inputs):
    hidden, weight, labels, _ = inputs
    with pytest.raises(TypeError, match="labels"):
        fused_linear_logprobs(hidden, weight, labels.tolist())


@pytest.mark.parametrize("shape", [(5,), (6, 1), (1, 6)])
def test_labels_shape_mismatch(inputs, shape):
    hidden, weight, _, _ = inputs
    with pytest.raises(ValueError, match="labels shape"):
        fused_linear_logprobs(hidden, weight, torch.zeros(shape, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# hidden / weight / bias
# ---------------------------------------------------------------------------------------------


def test_hidden_and_weight_must_be_tensors(inputs):
    hidden, weight, labels, _ = inputs
    with pytest.raises(TypeError, match="hidden"):
        fused_linear_logprobs(hidden.numpy(), weight, labels)
    with pytest.raises(TypeError, match="weight"):
        fused_linear_logprobs(hidden, weight.tolist(), labels)


def test_hidden_needs_a_feature_dim(inputs):
    _, weight, labels, _ = inputs
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_logprobs(torch.randn(8), weight, labels[:1].reshape(()))


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_hidden_dtype_must_be_floating(inputs, dtype):
    hidden, weight, labels, _ = inputs
    with pytest.raises(TypeError, match="hidden"):
        fused_linear_logprobs(hidden.to(dtype), weight.to(dtype), labels)


def test_weight_shape_mismatch(inputs):
    hidden, weight, labels, _ = inputs
    with pytest.raises(ValueError, match="weight"):
        fused_linear_logprobs(hidden, weight[:, :7], labels)  # H mismatch
    with pytest.raises(ValueError, match="weight"):
        fused_linear_logprobs(hidden, weight.unsqueeze(0), labels)  # not 2-D
    with pytest.raises(ValueError, match="weight"):
        fused_linear_logprobs(hidden, weight[:0], torch.full((6,), -100))  # V = 0


@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_weight_dtype_mismatch(inputs, weight_dtype):
    hidden, weight, labels, _ = inputs
    with pytest.raises(TypeError, match="weight"):
        fused_linear_logprobs(hidden, weight.to(weight_dtype), labels)


def test_bias_shape_dtype_and_type(inputs):
    hidden, weight, labels, bias = inputs
    with pytest.raises(ValueError, match="bias"):
        fused_linear_logprobs(hidden, weight, labels, bias=bias[:-1])
    with pytest.raises(ValueError, match="bias"):
        fused_linear_logprobs(hidden, weight, labels, bias=bias.unsqueeze(0))
    with pytest.raises(TypeError, match="bias"):
        fused_linear_logprobs(hidden, weight, labels, bias=bias.half())
    with pytest.raises(TypeError, match="bias"):
        fused_linear_logprobs(hidden, weight, labels, bias=bias.tolist())


def test_device_mismatch_is_reported(inputs):
    """'meta' tensors stand in for a second device (no GPU needed)."""
    hidden, weight, labels, bias = inputs
    with pytest.raises(ValueError, match="weight"):
        fused_linear_logprobs(hidden, weight.to("meta"), labels)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_logprobs(hidden, weight, labels.to("meta"))
    with pytest.raises(ValueError, match="bias"):
        fused_linear_logprobs(hidden, weight, labels, bias=bias.to("meta"))


# ---------------------------------------------------------------------------------------------
# scalars: temperature, softcap, ignore_index
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan"), 0])
def test_temperature_must_be_positive_finite(inputs, value):
    hidden, weight, labels, _ = inputs
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprobs(hidden, weight, labels, temperature=value)


@pytest.mark.parametrize("value", [0.0, -2.0, float("inf"), float("nan")])
def test_softcap_must_be_positive_finite(inputs, value):
    hidden, weight, labels, _ = inputs
    with pytest.raises(ValueError, match="softcap"):
        fused_linear_logprobs(hidden, weight, labels, softcap=value)


@pytest.mark.parametrize("name", ["temperature", "softcap"])
@pytest.mark.parametrize("value", ["1.0", True, torch.tensor(1.0)], ids=["str", "bool", "tensor"])
def test_scalar_arguments_must_be_numbers(inputs, name, value):
    hidden, weight, labels, _ = inputs
    with pytest.raises(TypeError, match=name):
        fused_linear_logprobs(hidden, weight, labels, **{name: value})


def test_integer_temperature_and_softcap_are_accepted(inputs):
    hidden, weight, labels, _ = inputs
    out = fused_linear_logprobs(hidden, weight, labels, temperature=2, softcap=3)
    ref = reference_token_logprobs(hidden, weight, labels, temperature=2.0, softcap=3.0)
    assert relative_error(out, ref) <= 1e-5


@pytest.mark.parametrize("value", [-100.0, "x", True, None])
def test_ignore_index_must_be_an_int(inputs, value):
    hidden, weight, labels, _ = inputs
    with pytest.raises(TypeError, match="ignore_index"):
        fused_linear_logprobs(hidden, weight, labels, ignore_index=value)


# ---------------------------------------------------------------------------------------------
# backend and chunk budget (arguments and environment)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cuda", "Triton", "", None])
def test_bad_backend_name(inputs, backend):
    hidden, weight, labels, _ = inputs
    with pytest.raises(ValueError, match="backend"):
        fused_linear_logprobs(hidden, weight, labels, backend=backend)


def test_bad_backend_env(inputs, monkeypatch):
    hidden, weight, labels, _ = inputs
    monkeypatch.setenv("DFTKERN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="DFTKERN_BACKEND"):
        fused_linear_logprobs(hidden, weight, labels)
    fused_linear_logprobs(hidden, weight, labels, backend="torch")  # an explicit backend ignores the env


def test_triton_backend_rejects_float64(inputs, triton_cpu):
    hidden, weight, labels, _ = inputs
    with pytest.raises(ValueError, match="backend='triton'.*float64"):
        fused_linear_logprobs(hidden.double(), weight.double(), labels, backend="triton")


def test_triton_backend_on_cpu_needs_the_interpreter(inputs, monkeypatch):
    hidden, weight, labels, _ = inputs
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton'.*TRITON_INTERPRET"):
        fused_linear_logprobs(hidden, weight, labels, backend="triton")


def test_env_backend_torch_is_honoured(inputs, monkeypatch):
    hidden, weight, labels, _ = inputs
    calls = []
    original = TorchRowEngine.lse_and_logp
    monkeypatch.setattr(TorchRowEngine, "lse_and_logp",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    monkeypatch.setenv("DFTKERN_BACKEND", "torch")
    fused_linear_logprobs(hidden, weight, labels)
    assert calls == [1]
    # (DFTKERN_BACKEND=triton is exercised in test_logprobs_triton_interpreter.py)


@pytest.mark.parametrize("chunk_bytes", [0, -5, 1.5, 1e6, True, "1M"], ids=lambda v: repr(v))
def test_bad_chunk_bytes(inputs, chunk_bytes):
    hidden, weight, labels, _ = inputs
    with pytest.raises(ValueError, match="chunk_bytes"):
        fused_linear_logprobs(hidden, weight, labels, chunk_bytes=chunk_bytes)


@pytest.mark.parametrize("env_value", ["lots", "0", "-4K", "1.5.2M"])
def test_bad_chunk_bytes_env(inputs, monkeypatch, env_value):
    hidden, weight, labels, _ = inputs
    monkeypatch.setenv("DFTKERN_CHUNK_BYTES", env_value)
    with pytest.raises(ValueError, match="DFTKERN_CHUNK_BYTES"):
        fused_linear_logprobs(hidden, weight, labels)


@pytest.mark.parametrize("env_value,rows_per_chunk", [("1", 1), ("40000", 10), ("39K", 9), ("1M", 37), ("1G", 37)])
def test_chunk_bytes_env_is_honoured(monkeypatch, forward_chunk_rows, env_value, rows_per_chunk):
    """V = 1000 fp32 logits without transform: 4000 bytes per token row on the torch engine."""
    hidden, weight, labels, _ = make_inputs(37, 8, 1000, seed=51)
    monkeypatch.delenv("DFTKERN_BACKEND", raising=False)
    monkeypatch.delenv("DFTKERN_CHUNK_BYTES", raising=False)
    baseline = fused_linear_logprobs(hidden, weight, labels, backend="torch")
    forward_chunk_rows.clear()
    monkeypatch.setenv("DFTKERN_CHUNK_BYTES", env_value)
    out = fused_linear_logprobs(hidden, weight, labels, backend="torch")
    expected = [rows_per_chunk] * (37 // rows_per_chunk) + ([37 % rows_per_chunk] if 37 % rows_per_chunk else [])
    assert forward_chunk_rows == expected
    torch.testing.assert_close(out, baseline, rtol=1e-6, atol=1e-6)
    # the argument beats the environment
    forward_chunk_rows.clear()
    fused_linear_logprobs(hidden, weight, labels, backend="torch", chunk_bytes=37 * 4000)
    assert forward_chunk_rows == [37]


# ---------------------------------------------------------------------------------------------
# sequence_logprobs layouts
# ---------------------------------------------------------------------------------------------


def test_sequence_logprobs_padded_needs_3d_hidden(inputs):
    hidden, weight, labels, _ = inputs
    with pytest.raises(ValueError, match="hidden"):
        sequence_logprobs(hidden, weight, labels)


def test_sequence_logprobs_packed_needs_2d_hidden(inputs):
    hidden, weight, labels, _ = inputs
    with pytest.raises(ValueError, match="hidden"):
        sequence_logprobs(hidden.reshape(2, 3, 8), weight, labels.reshape(2, 3), cu_seqlens=[0, 3, 6])


@pytest.mark.parametrize("cu_seqlens", [[0, 3, 5], [1, 3, 6], [0, 4, 3, 6], []],
                         ids=["short-end", "nonzero-start", "decreasing", "empty"])
def test_sequence_logprobs_bad_cu_seqlens_values(inputs, cu_seqlens):
    hidden, weight, labels, _ = inputs
    with pytest.raises(ValueError, match="cu_seqlens"):
        sequence_logprobs(hidden, weight, labels, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("cu_seqlens", [torch.tensor([0.0, 3.0, 6.0]), torch.tensor([[0, 3, 6]]),
                                        torch.tensor([False, True]), [0, 3.0, 6], [0, 3.5, 6], [0, True, 6]],
                         ids=["float", "2-D", "bool", "list-float", "list-fraction", "list-bool"])
def test_sequence_logprobs_bad_cu_seqlens_tensor(inputs, cu_seqlens):
    hidden, weight, labels, _ = inputs
    with pytest.raises(TypeError, match="cu_seqlens"):
        sequence_logprobs(hidden, weight, labels, cu_seqlens=cu_seqlens)


def test_sequence_logprobs_validates_like_the_token_op(inputs):
    hidden, weight, labels, _ = inputs
    with pytest.raises(ValueError, match="temperature"):
        sequence_logprobs(hidden, weight, labels, cu_seqlens=[0, 6], temperature=0.0)
    with pytest.raises(TypeError, match="labels"):
        sequence_logprobs(hidden, weight, labels.float(), cu_seqlens=[0, 6])


# ---------------------------------------------------------------------------------------------
# strict arguments (issue 9, item 5)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_value", ["inf", "nan", "1e400", "-inf", "12e3", "0.4"])
def test_chunk_bytes_env_non_finite_or_odd_forms(inputs, monkeypatch, env_value):
    """Never an OverflowError: a ValueError naming the variable and listing the accepted forms."""
    hidden, weight, labels, _ = inputs
    monkeypatch.setenv("DFTKERN_CHUNK_BYTES", env_value)
    with pytest.raises(ValueError, match=r"DFTKERN_CHUNK_BYTES.*256M"):
        fused_linear_logprobs(hidden, weight, labels)


@pytest.mark.parametrize("value", ["no", "yes", 1, 0, torch.tensor(True)], ids=["no", "yes", "1", "0", "tensor"])
def test_validate_must_be_bool_or_none(inputs, value):
    hidden, weight, labels, _ = inputs
    with pytest.raises(TypeError, match="validate"):
        fused_linear_logprobs(hidden, weight, labels, validate=value)


def test_validate_env_parsed_strictly(inputs, monkeypatch):
    hidden, weight, labels, _ = inputs
    for ok in ("1", "TRUE", "off", "No", ""):
        monkeypatch.setenv("DFTKERN_VALIDATE", ok)
        fused_linear_logprobs(hidden, weight, labels)
    monkeypatch.setenv("DFTKERN_VALIDATE", "maybe")
    with pytest.raises(ValueError, match=r"DFTKERN_VALIDATE.*1/true/yes/on"):
        fused_linear_logprobs(hidden, weight, labels)


def test_list_inputs_are_type_errors_naming_the_argument(inputs):
    hidden, weight, labels, _ = inputs
    with pytest.raises(TypeError, match="hidden"):
        fused_linear_logprobs(hidden.tolist(), weight, labels)
    with pytest.raises(TypeError, match="hidden"):
        sequence_logprobs(hidden.tolist(), weight, labels, cu_seqlens=[0, 6])
    with pytest.raises(TypeError, match="weight"):
        fused_linear_logprobs(hidden, weight.tolist(), labels)


def test_cu_seqlens_with_padded_hidden_says_packed_was_expected(inputs):
    hidden, weight, labels, _ = inputs
    with pytest.raises(ValueError, match=r"with cu_seqlens, hidden must be packed \[N, H\]"):
        sequence_logprobs(hidden.reshape(2, 3, 8), weight, labels.reshape(2, 3), cu_seqlens=[0, 3, 6])


@pytest.mark.parametrize("bad,error", [(torch.tensor([0.0, 1.0]), TypeError), ([0, 1], TypeError),
                                       (torch.tensor([[0, 1]]), ValueError), (torch.tensor([1, 0]), ValueError),
                                       (torch.tensor([0, 9]), ValueError), (torch.tensor([0, 1]), ValueError)],
                         ids=["float", "list", "2-D", "decreasing", "out-of-range", "not-the-valid-set"])
def test_bad_valid_positions(inputs, bad, error):
    hidden, weight, labels, _ = inputs
    labels = labels.clone()
    labels[1] = -100
    with pytest.raises(error, match="valid_positions"):
        fused_linear_logprobs(hidden, weight, labels, valid_positions=bad)
