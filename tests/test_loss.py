"""core/loss.py: the chunked cross-entropy against a float64 reference and against torch's unchunked
cross_entropy, and causal_lm_loss against transformers' own loss on the smoke Llama."""

import pytest
import torch
import torch.nn.functional as F

from lotaqaf_cli.core.loss import CHUNK_BYTES, causal_lm_loss, chunk_tokens, chunked_cross_entropy

N, H, V = 37, 24, 101  # no chunk size below tried divides N


def _problem(dtype, seed=0, ignored=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignored] = -100
    return hidden, weight, labels


def _reference(hidden, weight, labels):
    """The unchunked loss in float64 and its gradients (hidden, weight), by autograd."""
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    keep = labels != -100
    logp = torch.log_softmax(h @ w.T, dim=-1)
    loss = -logp[keep].gather(1, labels[keep].unsqueeze(1)).sum() / keep.sum()
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _chunked(hidden, weight, labels, chunk, weight_grad=True):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_(weight_grad)
    loss = chunked_cross_entropy(h, w, labels, chunk)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("weight_grad", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 16, N, 4 * N])
def test_float32_matches_the_float64_reference(chunk, weight_grad):
    hidden, weight, labels = _problem(torch.float32)
    assert (labels == -100).any() and (labels != -100).any()
    ref_loss, ref_h, ref_w = _reference(hidden, weight, labels)
    loss, gh, gw = _chunked(hidden, weight, labels, chunk, weight_grad)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(gh.double(), ref_h, rtol=1e-5, atol=1e-7)
    assert torch.all(gh[labels == -100] == 0)  # no logits there: no gradient
    if weight_grad:
        torch.testing.assert_close(gw.double(), ref_w, rtol=1e-5, atol=1e-7)
    else:
        assert gw is None


@pytest.mark.parametrize("chunk", [1, 5, 4 * N])
def test_bfloat16_matches_the_float64_reference(chunk):
    hidden, weight, labels = _problem(torch.bfloat16)
    ref_loss, ref_h, ref_w = _reference(hidden, weight, labels)
    loss, gh, gw = _chunked(hidden, weight, labels, chunk)
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-2, atol=0)
    torch.testing.assert_close(gh.double(), ref_h, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw.double(), ref_w, rtol=2e-2, atol=2e-3)


def _torch_unchunked(hidden, weight, labels):
    """What transformers computes: the logits by nn.Linear, upcast, F.cross_entropy."""
    h = hidden.clone().requires_grad_()
    loss = F.cross_entropy(F.linear(h, weight).float(), labels)
    loss.backward()
    return loss.detach(), h.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_chunk_is_bit_identical_to_torch_cross_entropy(dtype):
    """Every label scored and one chunk: the same matmuls on the same shapes, the same softmax kernels,
    the same reduction, so the loss and the gradient of hidden are the same bits."""
    hidden, weight, labels = _problem(dtype, ignored=0.0)
    ref_loss, ref_h = _torch_unchunked(hidden, weight, labels)
    loss, gh, _ = _chunked(hidden, weight, labels, N, weight_grad=False)
    assert torch.equal(loss, ref_loss) and torch.equal(gh, ref_h)


@pytest.mark.parametrize("chunk", [1, 2, 5, 16, N])
def test_exact_logits_give_the_same_loss_bits_for_any_chunk(chunk):
    """Logits that every matmul computes exactly (small integers times powers of two): what is left,
    the float32 log-softmax and the mean over the labeled rows, is bit for bit cross_entropy's."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randint(-4, 5, (N, H), generator=g).float() / 8
    weight = torch.randint(-4, 5, (V, H), generator=g).float() / 4
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.3] = -100
    ref_loss, ref_h = _torch_unchunked(hidden, weight, labels)
    loss, gh, _ = _chunked(hidden, weight, labels, chunk, weight_grad=False)
    assert torch.equal(loss, ref_loss)
    # the gradient's matmul runs on chunk-sized blocks: the same to within a few float32 ulps of its scale
    torch.testing.assert_close(gh, ref_h, rtol=0, atol=64 * torch.finfo(torch.float32).eps * ref_h.abs().max().item())


def test_no_labeled_token_gives_nan_and_zero_gradients_as_torch():
    hidden, weight, labels = _problem(torch.float32)
    labels[:] = -100
    loss, gh, gw = _chunked(hidden, weight, labels, 8)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(hidden @ weight.T, labels))
    assert torch.all(gh == 0) and torch.all(gw == 0)


def test_chunk_tokens_keeps_one_chunk_of_float32_logits_under_the_budget():
    assert CHUNK_BYTES == 256 * 2**20
    assert chunk_tokens(128256) == 512 and chunk_tokens(49152) == 1344
    for vocab in (256, 32000, 49152, 128256, 151936, 262144, 10**8):
        n = chunk_tokens(vocab)
        assert n >= 1 and (n * vocab * 4 <= CHUNK_BYTES or n == 1)
        assert n < 64 or n % 64 == 0


def _batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 256, (3, 21), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :8] = -100                 # the prompt
    for r, L in ((1, 15), (2, 11)):      # right padding, as SFTBatches pads
        ids[r, L:], mask[r, L:], labels[r, L:] = 0, 0, -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("chunk", [None, 7])
def test_causal_lm_loss_matches_the_models_own_loss(smoke, checkpointing, chunk):
    """On the smoke Llama in train mode (tied embeddings / lm_head): the same loss and gradients as
    model(**batch).loss, with everything trainable, and with the layers trainable, the embeddings
    frozen and gradient checkpointing as the train stage sets them up."""
    model, b = smoke, _batch()
    model.train()
    if checkpointing:
        model.requires_grad_(False)
        for p in model.model.layers.parameters():
            p.requires_grad_(True)
        model.activation_checkpointing_enable()
        model.enable_input_require_grads()
    ref_loss, ref = _grads(model, lambda: model(**b).loss)
    loss, got = _grads(model, lambda: causal_lm_loss(model, b["input_ids"], b["attention_mask"], b["labels"],
                                                     chunk_tokens=chunk))
    assert got.keys() == ref.keys() and len(ref) > 0
    assert ("model.embed_tokens.weight" in ref) is not checkpointing
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)
