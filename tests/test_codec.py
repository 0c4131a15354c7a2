import pytest
import torch
from hypothesis import given, settings, strategies as st

from prime_scale.codec import SubtokenCodec
from prime_scale.radix import resolve_base
from prime_scale.config import ConfigError


def error_of(fn, *args) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    return str(info.value)


@settings(max_examples=200, deadline=None)
@given(C=st.integers(2, 70000), l=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_round_trip_and_base(C, l, seed):
    codec = SubtokenCodec(C, l)
    b = codec.base
    assert b**l >= C and (b - 1) ** l < C or b == 2
    g = torch.Generator().manual_seed(seed)
    tokens = torch.cat([torch.tensor([0, C - 1]), torch.randint(0, C, (64,), generator=g)])
    digits = codec.encode(tokens)
    assert digits.shape == (66, l)
    assert int(digits.min()) >= 0 and int(digits.max()) < b
    assert torch.equal(codec.decode(digits), tokens)
    # most significant digit first: the code is sum_j d_j b^(l-1-j)
    expected = sum(digits[:, j] * b ** (l - 1 - j) for j in range(l))
    assert torch.equal(expected, tokens)


@pytest.mark.parametrize("C,l", [(10, 2), (1000, 3), (1001, 3), (50257, 2), (256, 8), (3, 2)])
def test_every_code_decodes_and_invalid_codes_are_exactly_the_top(C, l):
    codec = SubtokenCodec(C, l)
    codes = torch.arange(codec.num_codes)
    digits = codec.digit_table
    assert torch.equal(codec.decode(digits), codes)
    assert torch.equal(codec.is_valid(codes), codes < C)
    assert int((~codec.is_valid(codes)).sum()) == codec.base**l - C


def test_l1_is_identity():
    codec = SubtokenCodec(97, 1)
    assert codec.base == 97
    tokens = torch.arange(97)
    assert torch.equal(codec.encode(tokens).squeeze(-1), tokens)


@pytest.mark.parametrize("C,l,b", [(256, 2, 16), (256, 4, 4), (256, 8, 2), (50257, 2, 225), (1000, 3, 10)])
def test_known_bases(C, l, b):
    assert SubtokenCodec(C, l).base == b


def test_explicit_base_and_errors():
    assert SubtokenCodec(100, 2, base=12).base == 12
    with pytest.raises(ValueError, match="base"):
        SubtokenCodec(100, 2, base=9)  # 81 codes < 100 tokens
    with pytest.raises(ValueError, match="C"):
        SubtokenCodec(1, 2)
    with pytest.raises(ValueError, match="l"):
        SubtokenCodec(10, 0)
    codec = SubtokenCodec(10, 2)
    with pytest.raises(ValueError, match="token ids"):
        codec.encode(torch.tensor([10]))
    with pytest.raises(ValueError, match="MASK"):
        codec.decode(torch.tensor([[codec.mask_id, 0]]))


# --- resolve_base --------------------------------------------------------------------------------------


def brute_force_base(c: int, l: int) -> int:
    b = 2
    while b**l < c:
        b += 1
    return b


@pytest.mark.parametrize(
    "c,l,b",
    [
        (1000, 3, 10),
        (1001, 3, 11),
        (2, 5, 2),
        (2, 1, 2),
        (3, 1, 3),
        (256, 1, 256),
        (256, 2, 16),
        (257, 2, 17),
        (256, 8, 2),
        (64, 3, 4),
        (125, 3, 5),
        (126, 3, 6),
        (50257, 2, 225),
        (50257, 16, 2),
        (2**40, 4, 1024),
        (2**40 + 1, 4, 1025),
        (10**18, 6, 1000),
        (10**18 + 1, 6, 1001),
    ],
)
def test_resolve_base_known_cases(c, l, b):
    assert resolve_base(c, l) == b


@settings(max_examples=300, deadline=None)
@given(c=st.integers(2, 100_000), l=st.integers(1, 8))
def test_resolve_base_matches_brute_force(c, l):
    b = resolve_base(c, l)
    assert b == brute_force_base(c, l)
    assert resolve_base(c, l, b) == b  # the resolved base is itself a valid explicit base
    assert resolve_base(c, l, b + 1) == b + 1


@settings(max_examples=100, deadline=None)
@given(c=st.integers(3, 100_000), l=st.integers(1, 8))
def test_resolve_base_rejects_too_small_explicit_base(c, l):
    b = resolve_base(c, l)
    if b > 2:
        with pytest.raises(ConfigError, match="fewer than vocab_size"):
            resolve_base(c, l, b - 1)


def test_resolve_base_input_errors():
    assert "vocab_size" in error_of(resolve_base, 1, 2)
    assert "num_subtokens" in error_of(resolve_base, 256, 0)
    assert "at least 2" in error_of(resolve_base, 256, 2, 1)


def test_resolve_base_huge_num_subtokens_is_fast():
    assert resolve_base(50257, 10**9) == 2
