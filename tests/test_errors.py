"""Clear errors on wrong layouts, shapes and dtypes, for every attention form."""
import pytest
import torch

from tnlib.ops import (
    linear_attention_chunked,
    linear_attention_quadratic,
    linear_attention_recurrent,
    softmax_attention,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


FORMS = [linear_attention_quadratic, linear_attention_recurrent, linear_attention_chunked]


def good(B=2, T=5, H=3, K=4, V=6, dtype=torch.float32):
    return (torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype),
            torch.randn(B, T, H, V, dtype=dtype), torch.full((H,), 0.1))


@pytest.mark.parametrize("fn", FORMS)
def test_three_dim_input_is_rejected(fn):
    q, k, v, s = good()
    with pytest.raises(ValueError, match=r"4 dims in layout \[B, T, H, D\]"):
        fn(q[0], k, v, s)


@pytest.mark.parametrize("fn", FORMS)
def test_bhtd_layout_is_caught_by_slope_shape(fn):
    q, k, v, s = good(T=7, H=3)
    # [B, H, T, D] passed by mistake: dim 2 (taken as H) is 7, slope has 3 entries
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    with pytest.raises(ValueError, match=r"slope must have shape \[H\]"):
        fn(qt, kt, vt, s)


@pytest.mark.parametrize("fn", FORMS)
def test_mismatched_shapes(fn):
    q, k, v, s = good()
    with pytest.raises(ValueError, match="k must have the shape of q"):
        fn(q, k[..., :2], v, s)
    with pytest.raises(ValueError, match="v must share"):
        fn(q, k, v[:, :3], s)


@pytest.mark.parametrize("fn", FORMS)
def test_dtypes(fn):
    q, k, v, s = good()
    with pytest.raises(TypeError, match="share one dtype"):
        fn(q, k.double(), v, s)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        fn(q.long(), k.long(), v.long(), s)
    with pytest.raises(TypeError, match="slope must be floating point"):
        fn(q, k, v, torch.ones(3, dtype=torch.int32))


@pytest.mark.parametrize("fn", FORMS)
def test_bad_slope_and_state(fn):
    q, k, v, s = good()
    with pytest.raises(ValueError, match="finite and >= 0"):
        fn(q, k, v, -s)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, H, K, V\]"):
        fn(q, k, v, s, torch.zeros(2, 3, 6, 4))


def test_empty_sequence_and_bad_block():
    q, k, v, s = good(T=0)
    with pytest.raises(ValueError, match="at least 1"):
        linear_attention_quadratic(q, k, v, s)
    q, k, v, s = good()
    with pytest.raises(ValueError, match="block_size"):
        linear_attention_chunked(q, k, v, s, block_size=0)


def test_not_a_tensor():
    q, k, v, s = good()
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        softmax_attention(q.numpy(), k, v)
