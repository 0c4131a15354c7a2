import pytest
import torch

from prime_scale.config import ModelConfig, load_config
from prime_scale.model import PrimeTransformer


@pytest.mark.parametrize(
    "name,low,high", [("owt_small", 150e6, 175e6), ("owt_medium", 380e6, 420e6), ("owt_large", 0.95e9, 1.1e9)]
)
def test_paper_scale_configs_have_their_size(name, low, high):
    cfg = load_config([f"config={name}", "prime.num_subtokens=1"])  # MDM size, the paper's reference count
    with torch.device("meta"):
        model = PrimeTransformer.from_config(cfg)
    assert low < model.num_params() < high


def test_prime_embedding_is_smaller_than_token_embedding():
    """l = 2 over C = 50257 embeds 2 x 226 digit values instead of 50258 tokens."""
    sizes = {}
    for l in (1, 2):
        cfg = load_config(["config=owt_small", f"prime.num_subtokens={l}"])
        with torch.device("meta"):
            model = PrimeTransformer.from_config(cfg)
        sizes[l] = model.embed.table.weight.shape
    assert sizes[1] == (50258, 768) and sizes[2] == (2 * 226, 768)


def test_output_depends_on_every_observed_digit_and_positions():
    torch.manual_seed(0)
    model = PrimeTransformer(ModelConfig(n_layer=2, d_model=32, n_head=2), vocab_size=50, num_subtokens=2).eval()
    b = model.codec.base
    x = torch.randint(0, b, (1, 6, 2))
    base_out = model(x)
    assert base_out.shape == (1, 6, 50)
    for j in range(2):
        y = x.clone()
        y[0, 3, j] = (y[0, 3, j] + 1) % b
        assert not torch.allclose(model(y)[0, 0], base_out[0, 0])  # bidirectional: position 0 sees position 3
    # RoPE: swapping two different positions changes the output at a third
    y = x.clone()
    y[0, [1, 2]] = y[0, [2, 1]]
    if not torch.equal(y, x):
        assert not torch.allclose(model(y)[0, 5], base_out[0, 5])


def test_time_conditioning_starts_neutral_and_is_required():
    torch.manual_seed(0)
    model = PrimeTransformer(ModelConfig(n_layer=1, d_model=32, n_head=2, time_conditioning=True), 20, 2)
    x = torch.randint(0, model.codec.base + 1, (2, 5, 2))
    # adaLN-Zero: the blocks start as the identity, so the mask rate cannot matter yet
    assert torch.allclose(model(x, torch.tensor([0.1, 0.1])), model(x, torch.tensor([0.9, 0.9])))
    with pytest.raises(ValueError, match="masking rate"):
        model(x)


def test_key_padding_mask_hides_padding():
    torch.manual_seed(0)
    model = PrimeTransformer(ModelConfig(n_layer=2, d_model=32, n_head=2), vocab_size=30, num_subtokens=1).eval()
    x = torch.randint(0, 30, (1, 8, 1))
    keep = torch.ones(1, 1, 1, 8, dtype=torch.bool)
    keep[..., 6:] = False
    y = x.clone()
    y[0, 6:] = (y[0, 6:] + 1) % 30
    assert torch.allclose(model(x, attn_mask=keep)[0, :6], model(y, attn_mask=keep)[0, :6], atol=1e-6)


def test_wrong_number_of_subtokens_is_a_clear_error():
    model = PrimeTransformer(ModelConfig(n_layer=1, d_model=16, n_head=2), vocab_size=30, num_subtokens=2)
    with pytest.raises(ValueError, match="expects 2 sub-tokens"):
        model(torch.zeros(1, 4, 3, dtype=torch.long))


def test_positions_of_several_tokens_keep_each_token_distinct():
    """Images put P pixel-channels in one position: the model still gives C logits per token, and which slot of
    the position a value sits in matters (each slot has its own embedding table)."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, d_model=32, n_head=2, tokens_per_position=3)
    model = PrimeTransformer(cfg, vocab_size=256, num_subtokens=2)
    assert model.head.weight.shape == (3 * 256, 32) and model.embed.table.weight.shape[0] == 3 * 2 * 17
    digits = torch.randint(0, 16, (2, 12, 2))
    logits = model(digits)
    assert logits.shape == (2, 12, 256)
    swapped = digits.clone()
    swapped[:, [0, 1]] = digits[:, [1, 0]]  # the same values in other slots of position 0
    assert not torch.allclose(model(swapped), logits)
    with pytest.raises(ValueError, match="do not fill positions of model.tokens_per_position=3"):
        model(digits[:, :10])


@pytest.mark.parametrize("P,objective", [(1, "diffusion"), (3, "diffusion"), (1, "ar")])
def test_flops_per_token_is_what_the_network_computes(P, objective):
    """flops_per_token against torch's FLOP counter on a real forward + backward (attention through the math
    kernel, which the counter sees as matmuls): equal for the bidirectional model, with positions of P tokens;
    the causal model is counted with half of the attention matmuls (what a causal kernel computes)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from prime_scale.metrics import flops_per_token

    torch.manual_seed(0)
    l = 2 if objective == "diffusion" else 1
    cfg = ModelConfig(n_layer=2, d_model=64, n_head=2, tokens_per_position=P, objective=objective, merge="mlp")
    model = PrimeTransformer(cfg, vocab_size=256, num_subtokens=l)
    B, N = 2, 48
    digits = torch.randint(0, model.codec.base, (B, N, l))
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(digits, causal=objective == "ar").float().square().sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = counts.pop("aten.bmm")
    expected = sum(counts.values()) + attention * (0.5 if objective == "ar" else 1.0)  # no time conditioning here
    assert flops_per_token(model, N) * B * N == pytest.approx(expected, rel=1e-12)
    assert attention == 12 * cfg.n_layer * cfg.d_model * (N // P) * (N // P) * B
